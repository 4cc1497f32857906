"""One drive of one batch: from whatever state PostgreSQL holds to a terminal status, or until its lease is lost.

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

Every write checks that this replica still holds the lease, and raises LeaseLost when it does not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from switchyard.services.ingress.batch_validation import ENDPOINTS, INSERT_ROWS, RESPONSES, store_lines
from switchyard.services.ingress.file_store import FileWriter, new_file_id
from switchyard.services.ingress.guarding import guard_batch_line, line_record
from switchyard.services.ingress.responses_api import to_chat_request
from switchyard.services.ingress.responses_output import from_chat_completion, response_id
from switchyard.shared import topics
from switchyard.shared.answers import answer
from switchyard.shared.batch import envelope_for, result_line, terminal, unanswered_line
from switchyard.shared.guardrails import count, decisions_from
from switchyard.shared.kafka import ensure_topics, make_consumer, start_client
from switchyard.shared.kafka_delivery import encode, send
from switchyard.shared.parts import Assembler
from switchyard.shared.pg import Connection, Query, Record

if TYPE_CHECKING:
    from switchyard.services.ingress.batch_driver import BatchDriver

log = logging.getLogger("switchyard.ingress.batches")

CANCEL_GRACE_S = float(os.environ.get("SWITCHYARD_BATCH_CANCEL_GRACE_S", "60"))
"""How long a cancelling batch waits for the lines already sent before it is cancelled without them."""
IN_FLIGHT_S = 20.0
MIN_IN_FLIGHT, MAX_IN_FLIGHT = 64, 5000

_RENEW = Query("UPDATE batches SET lease_until = now() + :lease WHERE id = :id AND driver = :me RETURNING *")
_COUNTS = Query(
    "SELECT count(*) FILTER (WHERE submitted) AS in_flight, count(*) FILTER (WHERE NOT submitted) AS"
    " unsent FROM batch_lines WHERE batch_id = :id AND status = 'pending'")
_UNSENT = Query("SELECT line, custom_id, body FROM batch_lines"
                " WHERE batch_id = :id AND submitted = false AND status = 'pending' ORDER BY line LIMIT :limit")
_SUBMITTED = Query("UPDATE batch_lines SET submitted = true WHERE batch_id = :id AND line = ANY(:lines)")
_STORE = Query(
    "UPDATE batch_lines AS l SET status = v.status, result = v.result"
    " FROM unnest(CAST(:lines AS int[]), CAST(:statuses AS text[]), CAST(:results AS bytea[]))"
    " AS v(line, status, result)"
    " WHERE l.batch_id = :id AND l.line = v.line AND l.status = 'pending' RETURNING v.status")
_ADVANCE = Query("UPDATE batches SET completed = completed + :ok, failed = failed + :failed,"
                 " reply_offset = :offset WHERE id = :id AND driver = :me")
_BODIES = Query("SELECT line, body FROM batch_lines WHERE batch_id = :id AND line = ANY(:lines)")
_VALIDATED = {
    "failed": Query(
        "UPDATE batches SET total = :total, status = 'failed', failed_at = now(), driver = NULL, lease_until = NULL,"
        " errors = :errors WHERE id = :id AND driver = :me AND status IN ('validating', 'cancelling')"),
    "in_progress": Query(
        "UPDATE batches SET total = :total,"
        " status = CASE WHEN status = 'validating' THEN 'in_progress' ELSE status END, in_progress_at = now()"
        " WHERE id = :id AND driver = :me AND status IN ('validating', 'cancelling')")}
_FINALIZING = Query("UPDATE batches SET status = 'finalizing', finalizing_at = now()"
                    " WHERE id = :id AND driver = :me AND status = 'in_progress'")
_UNANSWERED = Query("UPDATE batch_lines SET status = :status WHERE batch_id = :id AND status = 'pending'")
_FINISH = {final: Query(
    f"UPDATE batches SET status = :final, {final}_at = now(), output_file_id = :output_file_id,"
    " error_file_id = :error_file_id, driver = NULL, lease_until = NULL"
    " WHERE id = :id AND driver = :me AND status = :status") for final in ("completed", "cancelled", "expired")}
_RESULTS = Query("SELECT line, custom_id, status, result FROM batch_lines WHERE batch_id = :id AND line > :after"
                 " ORDER BY line LIMIT :limit")


def _timed_out(reply: Any) -> bool:
    """Whether a reply is the pipeline's deadline error (switchyard.shared.errors.timeout_error), not a provider's
    answer."""
    return reply.type == "error" and reply.status == 504 and ((reply.data or {}).get("error") or {}).get("code") \
        == "timeout"


class LeaseLost(Exception):
    """Another replica drives this batch now (or it is gone): stop without touching it."""


class BatchRun:
    """One drive of one batch, from whatever state PostgreSQL holds to a terminal status (or a lost lease)."""

    def __init__(self, driver: BatchDriver, batch_id: str) -> None:
        self.driver, self.id = driver, batch_id
        self.gateway = driver.gateway
        self.db = driver.database
        self.topic = f"{topics.BATCH_REPLY_PREFIX}{batch_id}"
        self.answered: deque[tuple[float, int]] = deque()
        self.assembler = Assembler()
        """Holds the parts of answers too large for one message until their response arrives."""

    async def renew(self) -> _Batch:
        """Extend the lease; returns the batch row with `in_flight` and `unsent` line counts, or LeaseLost."""
        async with self.db.transaction() as conn:
            row = await conn.fetchrow(_RENEW, {"id": self.id, "me": self.driver.me, "lease": self.driver.lease})
            if row is None:
                raise LeaseLost
            counts = await conn.fetchrow(_COUNTS, {"id": self.id})
            assert counts is not None  # an aggregate: always one row
        return _Batch(row, counts["in_flight"], counts["unsent"])

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

    async def follow(self, batch: _Batch, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
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

    async def submit(self, batch: _Batch, room: int) -> None:
        rows = await self.db.fetch(_UNSENT, {"id": self.id, "limit": room})
        if not rows:
            return
        responses = ENDPOINTS[batch.endpoint] == RESPONSES
        kind = "chat" if responses else ENDPOINTS[batch.endpoint]
        deadline_ms = int(batch.expires_at.timestamp() * 1000)
        record = self.gateway.keys.by_id.get(batch.key_id) if self.gateway.keys is not None else None
        key_guardrails = list(record.guardrails or []) if record is not None else []
        acks = []
        for row in rows:
            body = orjson.loads(row["body"])
            if responses:
                body = {**to_chat_request(body), "stream": False}
            blocked, decisions = guard_batch_line(self.gateway.guardrails, body, key_guardrails)  # masks in place
            env = envelope_for(f"{self.id}-{row['line']}", row["custom_id"], kind, body, self.topic,
                               deadline_ms, batch.key_id, batch.key_metadata, key_guardrails)
            if decisions:  # onto the line's usage row, as an interactive request's are
                self.gateway.publish_record(line_record(env.id, batch.key_id, env.model, kind, decisions, blocked))
            if blocked is not None:  # the line's answer is the refusal, on its reply topic: no provider call
                await answer(self.gateway.producer, env, blocked, service="ingress")
                continue
            acks.append(await send(self.gateway.producer, topics.REQUESTS, encode(env), key=env.id.encode()))
        await asyncio.gather(*acks)
        await self.db.execute(_SUBMITTED, {"id": self.id, "lines": [r["line"] for r in rows]})

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
        async with self.db.transaction() as conn:
            stored: list[str] = []
            if answers:
                stored = [row[0] for row in await conn.fetch(_STORE, {
                    "id": self.id, "lines": list(answers), "statuses": [s for s, _ in answers.values()],
                    "results": [r for _, r in answers.values()]})]
            done = await conn.execute(_ADVANCE, {
                "id": self.id, "me": self.driver.me, "ok": stored.count("ok"), "failed": stored.count("error"),
                "offset": records[-1].offset + 1})
            if not done:
                raise LeaseLost
        if stored:
            self.answered.append((time.monotonic(), len(stored)))

    async def as_responses(self, answers: dict[int, tuple[str, bytes]]) -> dict[int, tuple[str, bytes]]:
        """Chat answers of `/v1/responses` lines -> response objects (each needs its line's request)."""
        ok = [line for line, (status, _) in answers.items() if status == "ok"]
        if not ok:
            return answers
        bodies = {row["line"]: row["body"] for row in await self.db.fetch(_BODIES, {"id": self.id, "lines": ok})}
        out = dict(answers)
        for line in ok:
            result = orjson.loads(answers[line][1])
            rid = response_id(f"{self.id}-{line}")
            result["body"] = from_chat_completion(result["body"] or {}, orjson.loads(bodies[line]), rid)
            out[line] = ("ok", orjson.dumps(result))
        return out

    async def validate(self, batch: _Batch) -> None:
        """Check and store every line of the input file (batch_validation.py); the batch becomes
        `in_progress`, or `failed` with the line numbers of what is wrong (and no line stored)."""
        async with self.db.transaction() as conn:
            total, errors = await store_lines(conn, self.db, self.gateway, batch, self.id)
            params: dict[str, Any] = {"id": self.id, "me": self.driver.me, "total": 0 if errors else total}
            if errors:
                params["errors"] = {"object": "list", "data": errors}
            done = await conn.execute(_VALIDATED["failed" if errors else "in_progress"], params)
            if not done:
                raise LeaseLost
        log.info("batch validated", extra={"batch_id": self.id, "lines": total, "errors": len(errors)})

    async def finish(self, batch: _Batch, final: str) -> None:
        """Write the output and error files and the final status, in one transaction."""
        if final == "completed" and batch.status == "in_progress":
            await self.db.execute(_FINALIZING, {"id": self.id, "me": self.driver.me})
        unanswered = {"cancelled": ("batch_cancelled", "The batch was cancelled before this request ran."),
                      "expired": ("batch_expired", "This request could not be executed before the completion "
                                                   "window expired.")}.get(final)
        async with self.db.transaction() as conn:
            if unanswered:
                await conn.execute(_UNANSWERED, {"id": self.id, "status": final})
            output = await self.write_files(conn, batch, unanswered)
            done = await conn.execute(_FINISH[final], {
                "id": self.id, "me": self.driver.me, "final": final, **output,
                "status": "in_progress" if final == "expired" else "cancelling" if final == "cancelled" else
                "finalizing"})
            if not done:
                raise RuntimeError("the batch's status changed while it was finalized")  # rolled back; retried
        log.info("batch finished", extra={"batch_id": self.id, "status": final})

    async def write_files(self, conn: Connection, batch: _Batch,
                          unanswered: tuple[str, str] | None) -> dict[str, str | None]:
        writers: dict[str, FileWriter] = {}

        def writer(which: str) -> FileWriter:
            if which not in writers:
                writers[which] = FileWriter(conn, new_file_id(), batch.key_id, batch.team, "batch_output",
                                            f"{self.id}_{which}.jsonl")
            return writers[which]

        last = 0
        while True:
            rows = await conn.fetch(_RESULTS, {"id": self.id, "after": last, "limit": INSERT_ROWS})
            if not rows:
                break
            for row in rows:
                request_id = f"{self.id}-{row['line']}"
                if row["result"] is not None:
                    result = orjson.loads(row["result"])
                    await writer("output" if row["status"] == "ok" else "error").write(
                        result_line(row["custom_id"], request_id, result["status_code"], result["body"]))
                elif unanswered:
                    await writer("error").write(unanswered_line(row["custom_id"], request_id, *unanswered))
            last = rows[-1]["line"]
        out: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for which, w in writers.items():
            await w.close()
            out[f"{which}_file_id"] = w.file_id
        return out


class _Batch:
    """A batch row with its pending line counts; its columns read as attributes (`batch.status`)."""

    def __init__(self, row: Record, in_flight: int, unsent: int) -> None:
        self._row, self.in_flight, self.unsent = row, int(in_flight), int(unsent)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._row[name]
        except KeyError:
            raise AttributeError(name) from None
