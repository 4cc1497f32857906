"""The prompt-log writer and its retention, inside accounting.

`PromptLogWriter` consumes `llm.prompts` (its own consumer group, so prompt logging never holds up the
spend ledger): it stores the logged records in `prompt_log` in batches (a redelivered record is stored once:
the request id is the key) and writes each record's guardrail decisions onto the request's usage rows. Usage
rows may arrive after the record (another topic, another consumer); a record whose rows are not there yet is
tried again with each following batch for up to USAGE_WAIT_S. Offsets are committed after the batch's
transaction, so a crash replays the batch.

Retention: every RETENTION_EVERY_S, rows older than `logging.retention_days` are deleted RETENTION_BATCH at a
time, each batch its own short transaction (no long locks; readers and the writer carry on between batches).
`retention_days` is read from the config at start, so changing it needs a restart, never a migration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import topics
from shared.answers import problems
from shared.kafka import group_instance_id, make_consumer, start_client
from shared.prompt_log import PromptRecord, prompt_log

log = logging.getLogger("switchyard.accounting.prompts")

USAGE_WAIT_S = 120.0
RETENTION_BATCH = 1000
RETENTION_EVERY_S = float(os.environ.get("SWITCHYARD_RETENTION_INTERVAL_S", "60"))

_SET_GUARDRAILS = text("UPDATE usage SET guardrails = CAST(:guardrails AS jsonb) WHERE request_id = :request_id")
_DELETE_OLD = text("DELETE FROM prompt_log WHERE request_id IN "
                   "(SELECT request_id FROM prompt_log WHERE ts < :cutoff LIMIT :batch)")


def to_row(record: PromptRecord) -> dict[str, Any]:
    return {
        "request_id": record.request_id, "ts": datetime.fromtimestamp(record.ts_ms / 1000, tz=UTC),
        "key_id": record.key_id, "model": record.model, "kind": record.kind, "stream": record.stream,
        "status": record.status, "route": record.route, "attempts": record.attempts, "request": record.request,
        "answer": record.answer, "error": record.error, "timings": record.timings, "usage": record.usage,
        "guardrails": record.guardrails,
    }


class PromptLogWriter:
    def __init__(self, bootstrap: str, engine: AsyncEngine, retention_days: float) -> None:
        self.engine = engine
        self.retention_days = retention_days
        self.consumer: AIOKafkaConsumer = make_consumer(
            bootstrap=bootstrap, group_id="accounting-prompts",
            group_instance_id=group_instance_id("accounting-prompts"), tansu_fetch_wait_ms=100)
        self.waiting: dict[str, tuple[float, PromptRecord]] = {}
        """Records whose usage rows had not arrived yet: request id → (first tried, record)."""

    async def run(self) -> None:
        await start_client(self.consumer, "accounting-prompts")
        self.consumer.subscribe([topics.PROMPTS])
        retention = asyncio.create_task(self._retain_forever())
        try:
            while True:
                batches = await self.consumer.getmany(timeout_ms=500, max_records=500)
                records: list[PromptRecord] = []
                for messages in batches.values():
                    for message in messages:
                        try:
                            records.append(PromptRecord.model_validate_json(message.value))
                        except ValidationError as e:
                            log.error("dropping malformed prompt record", extra={"error": problems(e)})
                if records or self.waiting:
                    await self._until_stored(records)
                if batches:
                    await self.consumer.commit()
        finally:
            retention.cancel()
            await self.consumer.stop()

    async def _until_stored(self, records: list[PromptRecord]) -> None:
        delay = 0.5
        while True:
            try:
                await self._store(records)
                return
            except (OperationalError, DBAPIError, OSError) as e:
                log.warning("database unavailable; retrying the prompt records", extra={"error": repr(e)[:300]})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _store(self, records: list[PromptRecord]) -> None:
        rows = [to_row(r) for r in records if r.logged]
        now = time.monotonic()
        pending = {rid: entry for rid, entry in self.waiting.items() if now - entry[0] < USAGE_WAIT_S}
        for r in records:
            if r.guardrails:
                pending.setdefault(r.request_id, (now, r))
        async with self.engine.begin() as conn:
            if rows:
                await conn.execute(insert(prompt_log).on_conflict_do_nothing(index_elements=["request_id"]), rows)
            done = []
            for request_id, (_, record) in pending.items():
                result = await conn.execute(_SET_GUARDRAILS, {"request_id": request_id,
                                                              "guardrails": orjson.dumps(record.guardrails).decode()})
                if result.rowcount:
                    done.append(request_id)
        for request_id in done:
            pending.pop(request_id, None)
        self.waiting = pending

    async def retain(self) -> int:
        """Delete rows older than retention_days, RETENTION_BATCH per transaction; returns how many went."""
        cutoff = datetime.now(UTC) - timedelta(days=self.retention_days)
        deleted = 0
        while True:
            async with self.engine.begin() as conn:
                result = await conn.execute(_DELETE_OLD, {"cutoff": cutoff, "batch": RETENTION_BATCH})
            deleted += result.rowcount or 0
            if (result.rowcount or 0) < RETENTION_BATCH:
                return deleted
            await asyncio.sleep(0)  # let the writer in between batches

    async def _retain_forever(self) -> None:
        while True:
            try:
                deleted = await self.retain()
                if deleted:
                    log.info("prompt log retention", extra={"deleted": deleted, "days": self.retention_days})
            except Exception as e:
                log.warning("prompt log retention failed; will retry", extra={"error": repr(e)[:300]})
            await asyncio.sleep(RETENTION_EVERY_S)
