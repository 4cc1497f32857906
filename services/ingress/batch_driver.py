"""Runs the batches of the Batches API: any ingress replica may drive any batch; PostgreSQL says which one does.

A batch is driven by one replica at a time, the holder of its lease (`batches.driver`, `lease_until`, renewed
about every second). The replica that accepted a batch drives it at once; when that replica dies, it takes
its batches back as soon as it restarts (its driver name is its reply partition), and any other replica takes
them over once the lease has run out (SWITCHYARD_BATCH_LEASE_S). Everything a driver knows is in PostgreSQL:
- validating: the input file is read line by line from the store and checked (JSON, custom_id unique, method,
  url, body, model); the lines are stored with the batch in one transaction, or the batch `failed` with the
  line numbers of what is wrong;
- in_progress: lines are sent to `llm.requests` as batch traffic (`priority: batch`, the workers pace them
  behind interactive traffic to each deployment's limits) with the batch's own reply topic and request id
  `<batch id>-<line>`, a window at a time (about IN_FLIGHT_S of the observed answer rate, so a cancel takes
  effect soon). A line is marked submitted once the broker acknowledged it: the pipeline then owes it exactly
  one answer (design invariant 1), so it is never sent again unless the driver died between the two;
- each answer is stored on its line only while the line is still pending, in the transaction that advances
  `reply_offset`: a duplicate delivery, or an answer that arrives after a line was cancelled or expired,
  changes nothing, and a new driver resumes reading where the last one committed;
- finalizing: the output and error files are written from the lines, with the final status, in one
  transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel
from sqlalchemy import case, delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from switchyard.services.ingress.database import DATABASE_ERRORS
from switchyard.services.ingress.file_store import FileWriter, lines, new_file_id
from switchyard.services.ingress.guarding import guard_batch_line, line_record
from switchyard.services.ingress.responses_api import to_chat_request
from switchyard.services.ingress.responses_output import from_chat_completion, response_id
from switchyard.services.ingress.validation import MAX_BODY_BYTES, ChatCompletionRequest, EmbeddingsRequest
from switchyard.services.ingress.validation import validate as validate_body
from switchyard.shared import topics
from switchyard.shared.answers import answer
from switchyard.shared.batch import (
    URL_KINDS,
    LineError,
    envelope_for,
    parse_line,
    result_line,
    terminal,
    unanswered_line,
)
from switchyard.shared.db import batch_lines, batches, files, make_engine
from switchyard.shared.errors import GatewayError
from switchyard.shared.guardrails import count, decisions_from
from switchyard.shared.kafka import ensure_topics, make_consumer, start_client
from switchyard.shared.kafka_delivery import encode, send
from switchyard.shared.parts import Assembler

if TYPE_CHECKING:
    from switchyard.services.ingress.app import Gateway

log = logging.getLogger("switchyard.ingress.batches")

LEASE_S = float(os.environ.get("SWITCHYARD_BATCH_LEASE_S", "30"))
"""How long a batch stays with a replica that stopped renewing its lease before another takes it over."""
CANCEL_GRACE_S = float(os.environ.get("SWITCHYARD_BATCH_CANCEL_GRACE_S", "60"))
"""How long a cancelling batch waits for the lines already sent before it is cancelled without them."""
CLAIM_EVERY_S = 2.0
MAX_BATCHES = 16
"""Batches one replica drives at once (more wait in PostgreSQL for a free driver)."""
MAX_LINES = 50_000
"""OpenAI's limit of requests per batch."""
MAX_LISTED_ERRORS = 100
IN_FLIGHT_S = 20.0
MIN_IN_FLIGHT, MAX_IN_FLIGHT = 64, 5000
INSERT_ROWS = 500
BODY_MODELS: dict[str, type[BaseModel]] = {"chat": ChatCompletionRequest, "embeddings": EmbeddingsRequest}
RESPONSES = "responses"
ENDPOINTS = {**URL_KINDS, "/v1/responses": RESPONSES}
"""The endpoints a batch may name. A `/v1/responses` line runs as chat (translated when it is sent) and its
answer is translated back to a response object when it is stored, as `POST /v1/responses` does."""


def _timed_out(reply: Any) -> bool:
    """Whether a reply is the pipeline's deadline error (switchyard.shared.errors.timeout_error), not a provider's
    answer."""
    return reply.type == "error" and reply.status == 504 and ((reply.data or {}).get("error") or {}).get("code") \
        == "timeout"


class LeaseLost(Exception):
    """Another replica drives this batch now (or it is gone): stop without touching it."""


class BatchDriver:
    """Claims unfinished batches whose lease is free and drives each in its own task."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.me = f"ingress-{gateway.reply_partition}"
        self.lease = timedelta(seconds=LEASE_S)
        self.running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._engine: AsyncEngine | None = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            self._engine = make_engine(self.gateway.settings.database_url, pool_size=4, connect_timeout_s=5.0,
                                       command_timeout_s=60.0, pool_timeout_s=30.0)
        return self._engine

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._claim()
                except DATABASE_ERRORS as e:
                    log.warning("could not claim batches", extra={"error": repr(e)[:300]})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), CLAIM_EVERY_S)
                self._wake.clear()
        finally:
            for task in list(self.running.values()):
                task.cancel()
            await asyncio.gather(*self.running.values(), return_exceptions=True)
            if self._engine is not None:
                await self._engine.dispose()

    async def _claim(self) -> None:
        free = MAX_BATCHES - len(self.running)
        if free <= 0:
            return
        async with self.engine.begin() as conn:
            ids = (await conn.execute(text(
                "UPDATE batches SET driver = :me, lease_until = now() + :lease WHERE id IN ("
                " SELECT id FROM batches WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling')"
                " AND (driver = :me OR lease_until IS NULL OR lease_until < now()) AND NOT (id = ANY(:running))"
                " ORDER BY created_at LIMIT :free FOR UPDATE SKIP LOCKED) RETURNING id"),
                {"me": self.me, "lease": self.lease, "running": list(self.running), "free": free})).scalars().all()
        for batch_id in ids:
            self.running[batch_id] = asyncio.create_task(self._drive(batch_id))

    async def _drive(self, batch_id: str) -> None:
        try:
            while True:
                try:
                    await BatchRun(self, batch_id).run()
                    return
                except LeaseLost:
                    log.info("batch driven elsewhere now", extra={"batch_id": batch_id})
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # the broker or PostgreSQL away: try again, the lease says if still ours
                    log.warning("batch driver failed; retrying", extra={"batch_id": batch_id, "error": repr(e)[:300]})
                    await asyncio.sleep(2.0)
        finally:
            self.running.pop(batch_id, None)


class BatchRun:
    """One drive of one batch, from whatever state PostgreSQL holds to a terminal status (or a lost lease)."""

    def __init__(self, driver: BatchDriver, batch_id: str) -> None:
        self.driver, self.id = driver, batch_id
        self.gateway = driver.gateway
        self.engine = driver.engine
        self.topic = f"{topics.BATCH_REPLY_PREFIX}{batch_id}"
        self.answered: deque[tuple[float, int]] = deque()
        self.assembler = Assembler()
        """Holds the parts of answers too large for one message until their response arrives."""

    async def renew(self) -> Any:
        """Extend the lease; returns the batch row with `in_flight` and `unsent` line counts, or LeaseLost."""
        async with self.engine.begin() as conn:
            row = (await conn.execute(
                update(batches).where(batches.c.id == self.id, batches.c.driver == self.driver.me)
                .values(lease_until=func.now() + self.driver.lease).returning(batches))).first()
            if row is None:
                raise LeaseLost
            counts = (await conn.execute(text(
                "SELECT count(*) FILTER (WHERE submitted) AS in_flight, count(*) FILTER (WHERE NOT submitted) AS"
                " unsent FROM batch_lines WHERE batch_id = :id AND status = 'pending'"), {"id": self.id})).one()
        return _Batch(row, counts.in_flight, counts.unsent)

    async def run(self) -> None:
        batch = await self.renew()
        if batch.status == "validating":
            await self.validate(batch)
            batch = await self.renew()
        if batch.status not in ("in_progress", "finalizing", "cancelling"):
            return
        await ensure_topics(self.gateway.settings.bootstrap_servers, {self.topic: 1})
        consumer = make_consumer(bootstrap=self.gateway.settings.bootstrap_servers, group_id=None,
                                 tansu_fetch_wait_ms=20)
        await start_client(consumer, "ingress-batch")
        try:
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            consumer.seek(tp, batch.reply_offset)
            await self.follow(batch, consumer, tp)
        finally:
            await consumer.stop()

    async def follow(self, batch: Any, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        """Send lines, store answers, and end the batch when it is done, cancelled or expired."""
        while True:
            now = time.time()
            if batch.status == "in_progress" and now < batch.expires_at.timestamp() and batch.unsent:
                room = self.window() - batch.in_flight
                if room > 0:
                    await self.submit(batch, room)
            records = (await consumer.getmany(tp, timeout_ms=500)).get(tp) or []
            if records:
                await self.store(records, batch.endpoint, batch.expires_at.timestamp())
            batch = await self.renew()
            if batch.status == "finalizing" or (batch.status == "in_progress" and not batch.in_flight
                                                and not batch.unsent):
                await self.finish(batch, "completed")
                return
            if batch.status == "cancelling" and (not batch.in_flight or
                                                 now > batch.cancelling_at.timestamp() + CANCEL_GRACE_S):
                await self.finish(batch, "cancelled")
                return
            if batch.status == "in_progress" and now >= batch.expires_at.timestamp():
                await self.finish(batch, "expired")
                return

    def window(self) -> int:
        """Lines to keep in flight: about IN_FLIGHT_S of the answer rate seen over the last 30 s."""
        cutoff = time.monotonic() - 30.0
        while self.answered and self.answered[0][0] < cutoff:
            self.answered.popleft()
        rate = sum(n for _, n in self.answered) / 30.0
        return int(min(MAX_IN_FLIGHT, max(MIN_IN_FLIGHT, rate * IN_FLIGHT_S)))

    async def submit(self, batch: Any, room: int) -> None:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                select(batch_lines.c.line, batch_lines.c.custom_id, batch_lines.c.body)
                .where(batch_lines.c.batch_id == self.id, batch_lines.c.submitted.is_(False),
                       batch_lines.c.status == "pending").order_by(batch_lines.c.line).limit(room))).all()
        if not rows:
            return
        responses = ENDPOINTS[batch.endpoint] == RESPONSES
        kind = "chat" if responses else ENDPOINTS[batch.endpoint]
        deadline_ms = int(batch.expires_at.timestamp() * 1000)
        record = self.gateway.keys.by_id.get(batch.key_id) if self.gateway.keys is not None else None
        key_guardrails = list(record.guardrails or []) if record is not None else []
        acks = []
        for row in rows:
            body = orjson.loads(row.body)
            if responses:
                body = {**to_chat_request(body), "stream": False}
            blocked, decisions = guard_batch_line(self.gateway.guardrails, body, key_guardrails)  # masks in place
            env = envelope_for(f"{self.id}-{row.line}", row.custom_id, kind, body, self.topic,
                               deadline_ms, batch.key_id, batch.key_metadata, key_guardrails)
            if decisions:  # onto the line's usage row, as an interactive request's are
                self.gateway.publish_record(line_record(env.id, batch.key_id, env.model, kind, decisions, blocked))
            if blocked is not None:  # the line's answer is the refusal, on its reply topic: no provider call
                await answer(self.gateway.producer, env, blocked, service="ingress")
                continue
            acks.append(await send(self.gateway.producer, topics.REQUESTS, encode(env), key=env.id.encode()))
        await asyncio.gather(*acks)
        async with self.engine.begin() as conn:
            await conn.execute(update(batch_lines).where(
                batch_lines.c.batch_id == self.id, batch_lines.c.line.in_([r.line for r in rows]))
                .values(submitted=True))

    async def store(self, records: list[Any], endpoint: str, expires_at_s: float) -> None:
        """Store each line's first answer and the position after `records`, in one transaction.

        A line the pipeline gave up on because the batch's window ran out (its deadline is the window's end)
        is not an answer: it stays pending, and the batch's expiry writes it as `batch_expired`."""
        prefix = f"{self.id}-"
        answers: dict[int, tuple[str, bytes]] = {}
        for record in records:
            reply = terminal(record.value, self.assembler)
            if reply is None or not reply.id.startswith(prefix) or not reply.id[len(prefix):].isdigit():
                continue
            self.assembler.forget(reply.id)
            if _timed_out(reply) and time.time() >= expires_at_s:
                continue
            ok = reply.type == "response" and 200 <= reply.status < 300
            if int(reply.id[len(prefix):]) not in answers:  # the worker's output decisions, counted as ingress
                count(decisions_from(reply.headers))        # counts an interactive request's (header dropped)
            answers.setdefault(int(reply.id[len(prefix):]), (
                "ok" if ok else "error", orjson.dumps({"status_code": reply.status, "body": reply.data})))
        if ENDPOINTS.get(endpoint) == RESPONSES:
            answers = await self.as_responses(answers)
        async with self.engine.begin() as conn:
            stored: list[str] = []
            if answers:
                stored = list((await conn.execute(_STORE, {
                    "id": self.id, "lines": list(answers), "statuses": [s for s, _ in answers.values()],
                    "results": [r for _, r in answers.values()]})).scalars().all())
            done = await conn.execute(
                update(batches).where(batches.c.id == self.id, batches.c.driver == self.driver.me)
                .values(completed=batches.c.completed + stored.count("ok"),
                        failed=batches.c.failed + stored.count("error"), reply_offset=records[-1].offset + 1))
            if not done.rowcount:
                raise LeaseLost
        if stored:
            self.answered.append((time.monotonic(), len(stored)))

    async def as_responses(self, answers: dict[int, tuple[str, bytes]]) -> dict[int, tuple[str, bytes]]:
        """Chat answers of `/v1/responses` lines -> response objects (each needs its line's request)."""
        ok = [line for line, (status, _) in answers.items() if status == "ok"]
        if not ok:
            return answers
        async with self.engine.connect() as conn:
            bodies = dict((await conn.execute(select(batch_lines.c.line, batch_lines.c.body).where(
                batch_lines.c.batch_id == self.id, batch_lines.c.line.in_(ok)))).tuples().all())
        out = dict(answers)
        for line in ok:
            result = orjson.loads(answers[line][1])
            rid = response_id(f"{self.id}-{line}")
            result["body"] = from_chat_completion(result["body"] or {}, orjson.loads(bodies[line]), rid)
            out[line] = ("ok", orjson.dumps(result))
        return out

    async def validate(self, batch: Any) -> None:
        """Check and store every line of the input file; the batch becomes `in_progress`, or `failed` with
        the line numbers of what is wrong (and no line stored)."""
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        keys = self.gateway.keys
        record = keys.by_id.get(batch.key_id) if keys is not None else None
        identity = record.identity() if record is not None else None
        total = 0
        rows: list[dict[str, Any]] = []

        def fail(number: int | None, code: str, message: str, param: str | None = None) -> None:
            errors.append({"code": code, "message": message, "param": param, "line": number})

        async with self.engine.begin() as conn:
            await conn.execute(delete(batch_lines).where(batch_lines.c.batch_id == self.id))
            exists = (await conn.execute(select(files.c.id).where(files.c.id == batch.input_file_id))).first()
            if exists is None:
                fail(None, "invalid_file", f"The input file {batch.input_file_id} no longer exists.",
                     "input_file_id")
            else:
                async for number, raw in lines(self.engine, batch.input_file_id, MAX_BODY_BYTES):
                    total += 1
                    if total > MAX_LINES:
                        fail(number, "too_many_lines", f"A batch may have at most {MAX_LINES} lines.")
                        break
                    if raw is None:
                        fail(number, "line_too_large", f"The line is longer than {MAX_BODY_BYTES} bytes.")
                        continue
                    try:
                        custom_id, line_kind, body = parse_line(number, raw, batch.endpoint, ENDPOINTS)
                        if custom_id in seen:
                            raise LineError(number, f"duplicate custom_id {custom_id[:100]!r}",
                                            "duplicate_custom_id", "custom_id")
                        seen.add(custom_id)
                        self.check_body(number, line_kind, body, identity)
                    except LineError as e:
                        if len(errors) < MAX_LISTED_ERRORS:
                            fail(e.number, e.code, e.reason, e.param)
                        continue
                    if not errors:
                        rows.append({"batch_id": self.id, "line": number, "custom_id": custom_id,
                                     "model": body["model"], "body": orjson.dumps(body), "submitted": False,
                                     "status": "pending"})
                        if len(rows) >= INSERT_ROWS:
                            await conn.execute(insert(batch_lines), rows)
                            rows = []
                if total == 0 and not errors:
                    fail(None, "empty_file", "The input file has no lines.")
            if errors:
                await conn.execute(delete(batch_lines).where(batch_lines.c.batch_id == self.id))
            elif rows:
                await conn.execute(insert(batch_lines), rows)
            values: dict[str, Any] = {"total": 0 if errors else total}
            if errors:
                values.update(status="failed", failed_at=func.now(), driver=None, lease_until=None,
                              errors={"object": "list", "data": errors})
            else:
                values.update(status=case((batches.c.status == "validating", "in_progress"), else_=batches.c.status),
                              in_progress_at=func.now())
            done = await conn.execute(update(batches).where(
                batches.c.id == self.id, batches.c.driver == self.driver.me,
                batches.c.status.in_(("validating", "cancelling"))).values(**values))
            if not done.rowcount:
                raise LeaseLost
        log.info("batch validated", extra={"batch_id": self.id, "lines": total, "errors": len(errors)})

    def check_body(self, number: int, kind: str, body: dict[str, Any], identity: Any) -> None:
        """What ingress checks of the same body sent over HTTP, as a LineError."""
        try:
            if kind == RESPONSES:
                kind, body = "chat", to_chat_request(body)
            validate_body(BODY_MODELS[kind], body)
        except GatewayError as e:
            raise LineError(number, e.message, "invalid_body", f"body.{e.param}" if e.param else "body") from None
        model = body["model"]
        if self.gateway.config.group(model) is None:
            raise LineError(number, f"The model '{model}' does not exist.", "model_not_found", "body.model")
        if identity is not None and not identity.may_use(model):
            raise LineError(number, f"This key may not use the model '{model}'.", "model_not_allowed", "body.model")

    async def finish(self, batch: Any, final: str) -> None:
        """Write the output and error files and the final status, in one transaction."""
        if final == "completed" and batch.status == "in_progress":
            async with self.engine.begin() as conn:
                await conn.execute(update(batches).where(batches.c.id == self.id, batches.c.driver == self.driver.me,
                                                         batches.c.status == "in_progress")
                                   .values(status="finalizing", finalizing_at=func.now()))
        unanswered = {"cancelled": ("batch_cancelled", "The batch was cancelled before this request ran."),
                      "expired": ("batch_expired", "This request could not be executed before the completion "
                                                   "window expired.")}.get(final)
        async with self.engine.begin() as conn:
            if unanswered:
                await conn.execute(update(batch_lines).where(batch_lines.c.batch_id == self.id,
                                                             batch_lines.c.status == "pending").values(status=final))
            output = await self.write_files(conn, batch, unanswered)
            done = await conn.execute(update(batches).where(
                batches.c.id == self.id, batches.c.driver == self.driver.me,
                batches.c.status == ("in_progress" if final == "expired" else
                                     "cancelling" if final == "cancelled" else "finalizing"))
                .values(status=final, **{f"{final}_at": func.now()}, **output, driver=None, lease_until=None))
            if not done.rowcount:
                raise RuntimeError("the batch's status changed while it was finalized")  # rolled back; retried
        log.info("batch finished", extra={"batch_id": self.id, "status": final})

    async def write_files(self, conn: AsyncConnection, batch: Any,
                          unanswered: tuple[str, str] | None) -> dict[str, str | None]:
        writers: dict[str, FileWriter] = {}

        def writer(which: str) -> FileWriter:
            if which not in writers:
                writers[which] = FileWriter(conn, new_file_id(), batch.key_id, batch.team, "batch_output",
                                            f"{self.id}_{which}.jsonl")
            return writers[which]

        last = 0
        while True:
            rows = (await conn.execute(
                select(batch_lines.c.line, batch_lines.c.custom_id, batch_lines.c.status, batch_lines.c.result)
                .where(batch_lines.c.batch_id == self.id, batch_lines.c.line > last)
                .order_by(batch_lines.c.line).limit(INSERT_ROWS))).all()
            if not rows:
                break
            for row in rows:
                request_id = f"{self.id}-{row.line}"
                if row.result is not None:
                    result = orjson.loads(row.result)
                    await writer("output" if row.status == "ok" else "error").write(
                        result_line(row.custom_id, request_id, result["status_code"], result["body"]))
                elif unanswered:
                    await writer("error").write(unanswered_line(row.custom_id, request_id, *unanswered))
            last = rows[-1].line
        out: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for which, w in writers.items():
            await w.close()
            out[f"{which}_file_id"] = w.file_id
        return out


class _Batch:
    """A batch row with its pending line counts."""

    def __init__(self, row: Any, in_flight: int, unsent: int) -> None:
        self._row, self.in_flight, self.unsent = row, int(in_flight), int(unsent)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._row, name)


_STORE = text(
    "UPDATE batch_lines AS l SET status = v.status, result = v.result"
    " FROM unnest(CAST(:lines AS int[]), CAST(:statuses AS text[]), CAST(:results AS bytea[]))"
    " AS v(line, status, result)"
    " WHERE l.batch_id = :id AND l.line = v.line AND l.status = 'pending' RETURNING v.status")
