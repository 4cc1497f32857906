"""`switchyard accounting`: consume `llm.usage`, price each event, store it in PostgreSQL.

Offsets are committed only after the batch's transaction has committed, so a crash replays
the batch and the unique event id drops what was already stored. While PostgreSQL is down
the batch is retried and consumption waits: nothing is lost, lag grows. A rebalance commits what
was stored before the partitions move, and a commit the group refuses is logged, not fatal: the
batch is redelivered and stored once.

No message can stall the ledger: an event that does not validate is dead-lettered as `unreadable`, one that
PostgreSQL refuses for good (a value no column can hold) as `unstorable`, found by bisecting its batch
(shared/storable.py) so that every other event of the batch is stored; then the offsets move on.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from opentelemetry.trace import SpanContext, SpanKind

from switchyard.services.accounting.ledger import to_row, write_batch
from switchyard.services.accounting.prompt_log import PromptLogWriter
from switchyard.shared import gc_settings, topics, tracing
from switchyard.shared.answers import read_or_bury
from switchyard.shared.config import load_config
from switchyard.shared.contracts import IN_DOUBT, UsageEvent
from switchyard.shared.dead import UNSTORABLE, bury_consumed
from switchyard.shared.health import serve_health
from switchyard.shared.kafka import LaggingFetch, group_instance_id, make_consumer, make_producer, start_client
from switchyard.shared.kafka_delivery import encode, send_and_wait
from switchyard.shared.kafka_offsets import BatchOffsets
from switchyard.shared.lag import follow_lag
from switchyard.shared.logs import setup_logging
from switchyard.shared.pg import Database
from switchyard.shared.service import run_until_signal
from switchyard.shared.settings import load_settings
from switchyard.shared.storable import store_until_stored

log = logging.getLogger("switchyard.accounting")
BATCH_MAX = 1000


@dataclass
class Row:
    """A consumed usage event and its priced row: the record is kept to dead-letter it unchanged."""

    record: ConsumerRecord[bytes, bytes]
    event: UsageEvent
    row: dict[str, Any]


class Accounting:
    def __init__(self, bootstrap: str, database_url: str) -> None:
        if not database_url:
            raise SystemExit("accounting needs DATABASE_URL (or a stack started by `switchyard up` here)")
        self.database = Database(database_url)
        self.lag = LaggingFetch(250)
        self.consumer: AIOKafkaConsumer = make_consumer(bootstrap=bootstrap, group_id=topics.ACCOUNTING_GROUP,
                                                        group_instance_id=group_instance_id(topics.ACCOUNTING_GROUP),
                                                        tansu_fetch_wait_ms=100, max_poll_records=BATCH_MAX,
                                                        **self.lag.options())
        self.offsets = BatchOffsets(self.consumer)
        self.producer: AIOKafkaProducer = make_producer(bootstrap)
        self.ready = False
        self.stored = 0

    async def start(self) -> None:
        await start_client(self.producer, "accounting-producer")
        await start_client(self.consumer, "accounting-consumer")
        self.consumer.subscribe([topics.USAGE], listener=self.offsets)

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.producer.stop()
        await self.database.close()

    async def run_forever(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=self.lag.read_timeout_ms, max_records=BATCH_MAX)
            self.lag.follow(self.consumer, bool(batches))
            self.ready = True
            if not batches:
                continue
            self.offsets.begin(batches)
            rows: list[Row] = []
            traced: list[tuple[SpanContext, UsageEvent]] = []
            started_ns = time.time_ns()
            for records in batches.values():
                for record in records:
                    if (row := await self._row(record)) is None:
                        continue
                    rows.append(row)
                    # A call's outcome is traced; the in-doubt record its worker wrote ahead of it is not (half
                    # the spans for nothing a trace reader needs while the outcome follows it).
                    if (tracing.enabled() and row.event.status != IN_DOUBT
                            and (parent := tracing.from_record(record.headers)) is not None):
                        tracing.wait_in_topic(record.topic, parent, record.timestamp)
                        traced.append((parent, row.event))
            if rows:
                await self._write_until_stored(rows)
            for parent, event in traced:
                tracing.start("account usage", parent, SpanKind.CONSUMER, {
                    "switchyard.request_id": event.request_id, "switchyard.event_id": event.event_id,
                    "db.system.name": "postgresql",
                    "gen_ai.usage.input_tokens": event.usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": event.usage.completion_tokens}, start_ns=started_ns).end()
            self.offsets.done()
            await self.offsets.commit()

    async def _row(self, record: ConsumerRecord[bytes, bytes]) -> Row | None:
        """The record's event and its priced row; None once a record that can be neither is dead-lettered."""
        event = await read_or_bury(self.producer, record, UsageEvent, "the usage event", service="accounting")
        if event is None:
            return None
        try:
            return Row(record, event, to_row(event))
        except (ValueError, OverflowError, OSError) as e:  # e.g. a ts_ms no date can hold
            await bury_consumed(self.producer, record, UNSTORABLE, f"the usage event cannot be stored: {e}"[:300],
                                service="accounting", request_id=event.request_id)
            return None

    async def _write_until_stored(self, rows: list[Row]) -> None:
        """Store the rows; a row PostgreSQL refuses for good is dead-lettered, any other database error is
        retried (the whole batch again: what a first try stored is stored once)."""
        _, refused = await store_until_stored(rows, self._store, log=log, what="the batch", extra={"rows": len(rows)})
        for bad in refused:
            row: Row = bad.item
            await bury_consumed(self.producer, row.record, UNSTORABLE, bad.error, service="accounting",
                                request_id=row.event.request_id)

    async def _store(self, rows: Sequence[Row]) -> None:
        """One transaction of rows, then the budget events it caused."""
        stored, events = await write_batch(self.database, [row.row for row in rows])
        self.stored += stored
        for event in events:
            await send_and_wait(self.producer, topics.KEYS, encode(event), key=event.key_id.encode())


async def serve(args: argparse.Namespace) -> None:
    settings = load_settings()
    accounting = Accounting(settings.bootstrap_servers, settings.database_url)
    tracing.setup_tracing("accounting")
    await accounting.start()
    if args.health_port:
        await serve_health(args.health_port, lambda: accounting.ready)
    log.info("accounting started")
    prompts = PromptLogWriter(settings.bootstrap_servers, accounting.database, load_config().logging.retention_days,
                              accounting.producer)
    await run_until_signal(log, accounting.run_forever(), prompts.run(), follow_lag(accounting.consumer, "accounting"))
    await accounting.stop()
    tracing.shutdown()


def run(args: argparse.Namespace) -> None:
    import uvloop

    setup_logging("accounting")
    gc_settings.freeze_startup_objects()
    uvloop.run(serve(args))
