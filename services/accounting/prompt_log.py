"""The prompt-log writer and its retention, inside accounting.

`PromptLogWriter` consumes `llm.prompts` (its own consumer group, so prompt logging never holds up the
spend ledger): it stores the logged records in `prompt_log` in batches (a redelivered record is stored once:
the request id is the key) and writes each record's guardrail decisions onto the request's usage rows. Usage
rows may arrive after the record (another topic, another consumer); a record whose rows are not there yet is
tried again with each following batch for up to USAGE_WAIT_S. Offsets are committed after the batch's
transaction, so a crash replays the batch. A record that does not validate is dead-lettered as `unreadable`;
one PostgreSQL refuses for good as `unstorable`, found by bisecting the batch (shared/storable.py), so the
other records are stored and the writer moves on.

Retention: every RETENTION_EVERY_S, rows older than `logging.retention_days` are deleted RETENTION_BATCH at a
time, each batch its own short transaction (no long locks; readers and the writer carry on between batches).
`retention_days` is read from the config at start, so changing it needs a restart, never a migration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from switchyard.shared import topics
from switchyard.shared.answers import read_or_bury
from switchyard.shared.dead import UNSTORABLE, bury_consumed
from switchyard.shared.kafka import group_instance_id, make_consumer, start_client
from switchyard.shared.pg import Column, Database, Query, column_arrays, unnest_rows
from switchyard.shared.prompt_log import PromptRecord
from switchyard.shared.storable import store_until_stored

log = logging.getLogger("switchyard.accounting.prompts")

USAGE_WAIT_S = 120.0
RETENTION_BATCH = 1000
RETENTION_EVERY_S = float(os.environ.get("SWITCHYARD_RETENTION_INTERVAL_S", "60"))

_SET_GUARDRAILS = Query("UPDATE usage SET guardrails = CAST(CAST(:guardrails AS text) AS jsonb) "
                        "WHERE request_id = :request_id")
_DELETE_OLD = Query("DELETE FROM prompt_log WHERE request_id IN "
                   "(SELECT request_id FROM prompt_log WHERE ts < :cutoff LIMIT :batch)")

PROMPT_LOG_COLUMNS: tuple[Column, ...] = (
    ("request_id", "text"), ("ts", "timestamp with time zone"), ("key_id", "text"), ("model", "text"),
    ("kind", "text"), ("stream", "boolean"), ("status", "integer"), ("route", "text"), ("attempts", "integer"),
    ("request", "jsonb"), ("answer", "jsonb"), ("error", "jsonb"), ("timings", "jsonb"), ("usage", "jsonb"),
    ("guardrails", "jsonb"),
)
"""The columns of prompt_log (shared/db.py; tests/test_accounting.py checks they agree)."""

_INSERT = Query(f"INSERT INTO prompt_log ({', '.join(name for name, _ in PROMPT_LOG_COLUMNS)}) "
                f"{unnest_rows(PROMPT_LOG_COLUMNS)} ON CONFLICT (request_id) DO NOTHING")
"""Store a batch's rows in one statement; a record stored before (a redelivery) is left as it is."""


def to_row(record: PromptRecord) -> dict[str, Any]:
    return {
        "request_id": record.request_id, "ts": datetime.fromtimestamp(record.ts_ms / 1000, tz=UTC),
        "key_id": record.key_id, "model": record.model, "kind": record.kind, "stream": record.stream,
        "status": record.status, "route": record.route, "attempts": record.attempts, "request": record.request,
        "answer": record.answer, "error": record.error, "timings": record.timings, "usage": record.usage,
        "guardrails": record.guardrails,
    }


@dataclass
class _Entry:
    """A record still to be stored: its prompt_log row (`insert`) and/or its guardrail decisions."""

    record: PromptRecord
    message: ConsumerRecord[bytes, bytes]
    """As consumed, to dead-letter it unchanged."""
    since: float
    row: dict[str, Any] | None
    """Its prompt_log row while that is still to be stored."""
    guardrails: str | None
    """Its guardrail decisions as JSON, if it has any."""


class PromptLogWriter:
    def __init__(self, bootstrap: str, database: Database, retention_days: float,
                 producer: AIOKafkaProducer) -> None:
        self.database = database
        self.producer = producer
        self.retention_days = retention_days
        self.consumer: AIOKafkaConsumer = make_consumer(
            bootstrap=bootstrap, group_id="accounting-prompts",
            group_instance_id=group_instance_id("accounting-prompts"), tansu_fetch_wait_ms=100)
        self.waiting: dict[str, _Entry] = {}
        """Records whose usage rows had not arrived yet, by request id (their own row is stored)."""

    async def run(self) -> None:
        await start_client(self.consumer, "accounting-prompts")
        self.consumer.subscribe([topics.PROMPTS])
        retention = asyncio.create_task(self._retain_forever())
        try:
            while True:
                batches = await self.consumer.getmany(timeout_ms=500, max_records=500)
                now = time.monotonic()
                entries: list[_Entry] = []
                for messages in batches.values():
                    for message in messages:
                        if (entry := await self._entry(message, now)) is not None:
                            entries.append(entry)
                if entries or self.waiting:
                    await self._until_stored(entries, now)
                if batches:
                    await self.consumer.commit()
        finally:
            retention.cancel()
            await self.consumer.stop()

    async def _entry(self, message: ConsumerRecord[bytes, bytes], now: float) -> _Entry | None:
        """What the record asks to store; None when it asks nothing, or once a record that cannot be read or
        converted is dead-lettered."""
        record = await read_or_bury(self.producer, message, PromptRecord, "the prompt record", service="accounting")
        if record is None:
            return None
        if not (record.logged or record.guardrails):
            return None
        try:
            return _Entry(record, message, now, row=to_row(record) if record.logged else None,
                          guardrails=orjson.dumps(record.guardrails).decode() if record.guardrails else None)
        except (ValueError, OverflowError, TypeError) as e:  # a ts_ms no date can hold, an integer JSON cannot
            await bury_consumed(self.producer, message, UNSTORABLE, f"the prompt record cannot be stored: {e}"[:300],
                                service="accounting", request_id=record.request_id)
            return None

    async def _until_stored(self, entries: list[_Entry], now: float) -> None:
        """Store the batch and the records still waiting; a record PostgreSQL refuses for good is
        dead-lettered, any other database error retried."""
        entries += [e for e in self.waiting.values() if now - e.since < USAGE_WAIT_S]
        results, refused = await store_until_stored(entries, self._store, log=log, what="the prompt records")
        done = set().union(*results)
        gone = {id(bad.item) for bad in refused}
        for bad in refused:
            entry: _Entry = bad.item
            await bury_consumed(self.producer, entry.message, UNSTORABLE, bad.error, service="accounting",
                                request_id=entry.record.request_id)
        self.waiting = {}
        for entry in entries:
            entry.row = None
            if entry.guardrails and entry.record.request_id not in done and id(entry) not in gone:
                self.waiting.setdefault(entry.record.request_id, entry)

    async def _store(self, entries: Sequence[_Entry]) -> set[str]:
        """One transaction: the entries' prompt_log rows, and their guardrail decisions onto their usage rows;
        returns the request ids whose usage rows took the decisions."""
        rows = [e.row for e in entries if e.row is not None]
        done: set[str] = set()
        async with self.database.transaction() as conn:
            if rows:
                await conn.execute(_INSERT, column_arrays(PROMPT_LOG_COLUMNS, rows))
            for entry in entries:
                if entry.guardrails is None:
                    continue
                if await conn.execute(_SET_GUARDRAILS, {"request_id": entry.record.request_id,
                                                        "guardrails": entry.guardrails}):
                    done.add(entry.record.request_id)
        return done

    async def retain(self) -> int:
        """Delete rows older than retention_days, RETENTION_BATCH per transaction; returns how many went."""
        cutoff = datetime.now(UTC) - timedelta(days=self.retention_days)
        deleted = 0
        while True:
            gone = await self.database.execute(_DELETE_OLD, {"cutoff": cutoff, "batch": RETENTION_BATCH})
            deleted += gone
            if gone < RETENTION_BATCH:
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
