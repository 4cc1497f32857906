"""Everything Switchyard does only because the broker is Tansu, the no-Java fallback of `switchyard up`.

Tansu is an in-memory Kafka-protocol broker. Three of its habits need code that Apache Kafka does not:
- it answers a waiting fetch only when the wait runs out, so hot consumers poll with short waits
  (`fetch_wait_ms`), where on Apache Kafka a long wait costs no latency;
- a restart loses every log: the supervisor re-creates the topics (`recreate_topics`), consumers
  positioned in the old logs read the new ones from the beginning (`RewindingConsumer`), and a batch
  job re-sends what its lost reply topic held (shared/batch.py asks `is_tansu()`);
- it keeps every message in memory and slows down on long partitions, and has neither retention nor
  DeleteRecords: the supervisor rotates it (switchyard/devstack/tansu_rotation.py) once its logs hold
  SWITCHYARD_TANSU_ROTATE_MESSAGES, when nothing acknowledged is left unprocessed (`unfinished`), while
  ingress holds new admissions (HOLD_SIGNAL, services/ingress/hold.py).

`is_tansu()` decides, from SWITCHYARD_BROKER (which `switchyard up` sets for every child) or, for the
CLI next to a running stack, from `.switchyard/stack.json`. Anything else, an external cluster
included, is Apache Kafka, and none of this code runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

log = logging.getLogger("switchyard.kafka")

BROKER_ENV = "SWITCHYARD_BROKER"
"""`kafka` (the default) or `tansu`: which broker the services talk to."""

TANSU_FETCH_WAIT_MS = 5
"""How long Tansu may hold an empty fetch of a latency-critical consumer: it answers only when the wait ends."""

HOLD_SIGNAL = signal.SIGUSR1
"""Sent by the supervisor to an ingress process: hold new admissions (they wait, they are not refused) for
HOLD_TTL_S, or until RELEASE_SIGNAL; sent again, it extends the hold."""
RELEASE_SIGNAL = signal.SIGUSR2
"""Sent by the supervisor to an ingress process: let held admissions go."""
HOLD_TTL_S = 10.0
"""How long one HOLD_SIGNAL holds: a supervisor that dies mid-hold costs held requests this much at most."""


@functools.cache
def is_tansu() -> bool:
    """True when this process talks to the embedded Tansu broker (see the module docstring)."""
    kind = os.environ.get(BROKER_ENV)
    if not kind:
        from switchyard.shared.settings import read_stack

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
        batches: dict[TopicPartition, list[ConsumerRecord]] = await super().getmany(
            *partitions, timeout_ms=timeout_ms, max_records=max_records)
        return batches

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

    from switchyard.shared.kafka import ensure_topics

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


async def _highwaters(probe: AIOKafkaConsumer, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The exact end of each partition's log, from a fetch's high watermark. Tansu's ListOffsets may be a batch
    behind (or more: 33 for 105 messages in batches), so it only tells where to fetch from: the fetch is small."""
    probe.assign(tps)
    for tp, end in (await probe.end_offsets(tps)).items():
        probe.seek(tp, end)
    while any(probe.highwater(tp) is None for tp in tps):
        await probe.getmany(timeout_ms=100)
    return {tp: probe.highwater(tp) for tp in tps}


def _probe(bootstrap: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=5,
                            client_id="switchyard-supervisor")


async def log_messages(bootstrap: str, wanted: dict[str, int], timeout_s: float = 10.0) -> int:
    """How many messages the broker's logs of `wanted` hold: what Tansu keeps in memory, and what makes its
    fetches slow."""
    from switchyard.shared.kafka import topic_partitions

    probe = _probe(bootstrap)
    await asyncio.wait_for(probe.start(), timeout_s)

    async def count() -> int:
        tps = [tp for topic in wanted for tp in await topic_partitions(probe, topic, timeout_s)]
        return sum((await _highwaters(probe, tps)).values())

    try:
        return await asyncio.wait_for(count(), timeout_s)
    finally:
        await probe.stop()


async def unfinished(bootstrap: str, groups: dict[str, list[str]], timeout_s: float = 10.0) -> dict[str, int]:
    """For each consumer group, how many messages of its topics it has not committed yet: all 0 when every
    group is caught up, i.e. when every message it was given has been worked and what it owed acknowledged
    (services commit only then, shared/kafka_offsets.py).

    Committed offsets come from OffsetFetch, asked by a consumer of each group that never joins it (no
    subscription, so no rebalance; the admin client's ListConsumerGroupOffsets fails against Tansu). The log
    ends are exact (`_highwaters`): a ListOffsets a batch behind would make a group that is behind look
    caught up.
    """
    from switchyard.shared.kafka import topic_partitions

    probe = _probe(bootstrap)
    await asyncio.wait_for(probe.start(), timeout_s)

    async def measure() -> dict[str, int]:
        owned = {group: [tp for topic in names for tp in await topic_partitions(probe, topic, timeout_s)]
                 for group, names in groups.items()}
        committed: dict[str, dict[TopicPartition, int]] = {}
        for group, tps in owned.items():
            member = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                      client_id="switchyard-supervisor")
            await member.start()
            try:
                found = await member._coordinator.fetch_committed_offsets(tps)
            finally:
                await member.stop()
            committed[group] = {tp: meta.offset for tp, meta in found.items()}
        ends = await _highwaters(probe, sorted({tp for tps in owned.values() for tp in tps}))
        return {group: sum(max(0, ends[tp] - committed[group].get(tp, 0)) for tp in tps)
                for group, tps in owned.items()}

    try:
        return await asyncio.wait_for(measure(), timeout_s)
    finally:
        await probe.stop()
