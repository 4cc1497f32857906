"""Everything Switchyard does only because the broker is Tansu, the no-Java fallback of `switchyard up`.

Tansu is an in-memory Kafka-protocol broker. Three of its habits need code that Apache Kafka does not:
- it answers a waiting fetch only when the wait runs out, so hot consumers poll with short waits
  (`fetch_wait_ms`), where on Apache Kafka a long wait costs no latency;
- a restart loses every log: the supervisor re-creates the topics (`recreate_topics`), consumers
  positioned in the old logs read the new ones from the beginning (`RewindingConsumer`), and a batch
  job re-sends what its lost reply topic held (shared/batch.py asks `is_tansu()`);
- it keeps every message in memory and slows down on long partitions; it has neither retention nor
  DeleteRecords, so nothing bounds that yet (an open item of issue 10).

`is_tansu()` decides, from SWITCHYARD_BROKER (which `switchyard up` sets for every child) or, for the
CLI next to a running stack, from `.switchyard/stack.json`. Anything else, an external cluster
included, is Apache Kafka, and none of this code runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

log = logging.getLogger("switchyard.kafka")

BROKER_ENV = "SWITCHYARD_BROKER"
"""`kafka` (the default) or `tansu`: which broker the services talk to."""

TANSU_FETCH_WAIT_MS = 5
"""How long Tansu may hold an empty fetch of a latency-critical consumer: it answers only when the wait ends."""


@functools.cache
def is_tansu() -> bool:
    """True when this process talks to the embedded Tansu broker (see the module docstring)."""
    kind = os.environ.get(BROKER_ENV)
    if not kind:
        from shared.config import read_stack

        kind = str(read_stack().get("broker_kind") or "kafka")
    return kind.strip().lower() == "tansu"


RECREATED_LOG_CHECK_S = 1.0
"""How often a `Consumer` compares its positions with the partitions' high watermarks (a local check)."""


class RewindingConsumer(AIOKafkaConsumer):  # type: ignore[misc]
    """An AIOKafkaConsumer that notices when a partition's log was re-created under it, and reads the new log
    from its beginning.

    Why: the embedded broker (`switchyard up`) keeps everything in memory. When it restarts, the supervisor
    re-creates the topics and every log starts again at offset 0, but each consumer keeps its position in the
    old log (say 5000). Tansu answers a fetch past the log end with an empty response and the new high
    watermark, not OFFSET_OUT_OF_RANGE, so aiokafka's `auto_offset_reset` never fires: the consumer waits,
    silently, until the new log grows past 5000, and then skips everything before. Group consumers
    usually rejoin (the new broker does not know their member id) and find no committed offset, but a
    manually assigned one never does (each ingress replica's reply partition, the ingress key events, the
    router's health events, a batch job's replies), and a group member that committed its old position
    to the new broker before rejoining is stuck the same way.

    How: at most every RECREATED_LOG_CHECK_S, `getmany`/`getone` compare each assigned, unpaused partition's
    position with the high watermark of its last fetch response: both are local, so the hot path costs no
    broker round trip. A position beyond the high watermark on two checks in a row is confirmed with one
    ListOffsets (`end_offsets`); the partitions still beyond their log end are sought to the *beginning*,
    not to the end: everything in a re-created log was written after the restart (replies and requests
    the services still owe), so it is read, not skipped. Duplicates this may redeliver are dropped by id
    downstream, as for any redelivery.

    Used on Tansu only: a log on Apache Kafka survives a broker restart, and a fetch past its end gets
    OFFSET_OUT_OF_RANGE. The two checks in a row, a second apart, and the ListOffsets confirmation ride
    out a high watermark that is briefly stale (right after a seek). (Tansu's ListOffsets may report less
    than the true end after a multi-record batch, never more, so the confirmation never holds back a real
    rewind; its fetch high watermark is exact.)
    """

    def __init__(self, *topics: str, **options: Any) -> None:
        super().__init__(*topics, **options)
        self._next_log_check = 0.0
        self._suspects: set[TopicPartition] = set()
        self.rewinds = 0
        """Partitions sought to their beginning because their log was re-created (for logs and tests)."""

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[ConsumerRecord]]:
        await self._maybe_check_logs()
        return await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)

    async def getone(self, *partitions: TopicPartition) -> ConsumerRecord:
        await self._maybe_check_logs()
        return await super().getone(*partitions)

    async def _maybe_check_logs(self) -> None:
        now = asyncio.get_running_loop().time()
        if now < self._next_log_check:
            return
        self._next_log_check = now + RECREATED_LOG_CHECK_S
        try:
            await self.rewind_recreated_logs()
        except Exception as e:  # noqa: BLE001 - a failed check must never stop consumption; the next one retries
            log.warning("could not check for re-created logs", extra={"error": repr(e)})

    def _beyond_highwater(self) -> dict[TopicPartition, int]:
        """Assigned, unpaused partitions whose position is past the high watermark of their last fetch."""
        subscription = self._subscription.subscription
        assignment = subscription.assignment if subscription is not None else None
        if assignment is None:
            return {}
        out: dict[TopicPartition, int] = {}
        for tp in assignment.tps:
            state = assignment.state_value(tp)
            if (state is None or state.paused or not state.has_valid_position or state.highwater is None
                    or state.position <= state.highwater):
                continue
            out[tp] = state.position
        return out

    async def rewind_recreated_logs(self) -> list[TopicPartition]:
        """Seek to the beginning the partitions whose log ends before this consumer's position (seen on two
        calls in a row, then confirmed by the broker); returns them. `getmany` calls it every
        RECREATED_LOG_CHECK_S by itself."""
        beyond = self._beyond_highwater()
        confirm = {tp: pos for tp, pos in beyond.items() if tp in self._suspects}
        self._suspects = set(beyond)
        if not confirm:
            return []
        ends = await asyncio.wait_for(self.end_offsets(list(confirm)), timeout=5.0)
        assigned = self.assignment()
        recreated = [tp for tp, pos in confirm.items() if tp in assigned and ends.get(tp, pos) < pos]
        if not recreated:
            return []
        log.warning("log re-created under this consumer (broker restarted?): reading it from the beginning",
                    extra={"partitions": {f"{tp.topic}[{tp.partition}]": [confirm[tp], ends[tp]]
                                          for tp in recreated}})
        await self.seek_to_beginning(*recreated)
        self._suspects.difference_update(recreated)
        self.rewinds += len(recreated)
        return recreated


async def recreate_topics(bootstrap: str, wanted: dict[str, int]) -> None:
    """Create `wanted` on a restarted Tansu; a topic that exists with another partition count (auto-created by
    an early client) is deleted and created again."""
    from aiokafka.admin import AIOKafkaAdminClient

    from shared.kafka import ensure_topics

    await ensure_topics(bootstrap, wanted)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="switchyard-supervisor")
    await admin.start()
    try:
        described = await admin.describe_topics(list(wanted))
        wrong = [t["topic"] for t in described if len(t.get("partitions") or []) != wanted.get(t["topic"])]
        if wrong:
            await admin.delete_topics(wrong)
    finally:
        await admin.close()
    if wrong:
        await ensure_topics(bootstrap, {name: wanted[name] for name in wrong})
