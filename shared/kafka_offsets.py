"""Committing consumed offsets: never past a message whose work is unfinished, and surviving rebalances.

Delivery is at-least-once: a consumer commits an offset only after what it owes for that message is
acknowledged, so whatever was not committed is redelivered and duplicates are dropped downstream by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

log = logging.getLogger("switchyard.kafka")



async def commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int] | None = None) -> bool:
    """Commit, surviving a rebalance: False (logged) when the group moved on or the partitions are no
    longer this member's. What was not committed is redelivered, and duplicates are dropped downstream by
    id, so the consumer carries on instead of exiting."""
    try:
        await consumer.commit(offsets)
        return True
    except (CommitFailedError, IllegalStateError) as e:
        log.warning("commit failed (the group rebalanced); its messages will be redelivered",
                    extra={"error": repr(e)})
    except KafkaError as e:
        log.warning("commit failed; the next one will cover it", extra={"error": repr(e)})
    return False


@dataclass(frozen=True, slots=True)
class Claim:
    """One message being worked on, from the partition's generation it was fetched in (see OffsetTracker)."""

    tp: TopicPartition
    offset: int
    generation: int


class OffsetTracker:
    """Tracks in-flight offsets per partition so commits never pass the oldest unfinished message.

    Each partition has a generation, bumped whenever its state is forgotten (revoked, or its log went
    back). A message's `Claim` carries the generation it started in, and `finished` ignores a claim from an
    older one: a task that outlived its partition's revocation (a call still running after the drain)
    must not mark an offset finished for the partition's next assignment, where the same offset is the
    new owner's unfinished message.
    """

    def __init__(self) -> None:
        self._inflight: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._generation: dict[TopicPartition, int] = {}

    def started(self, tp: TopicPartition, offset: int) -> Claim:
        if offset < self._next.get(tp, 0):
            # The consumer went back (a `Consumer` rewound a re-created log; revoked partitions are forgotten
            # first): what was tracked belongs to the old log, and committing its offsets would skip the new one.
            log.warning("offsets went back; tracking the partition afresh",
                        extra={"partition": f"{tp.topic}[{tp.partition}]", "offset": offset,
                               "expected": self._next[tp]})
            self.forget([tp])
        self._inflight.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)
        return Claim(tp, offset, self._generation.get(tp, 0))

    def finished(self, claim: Claim) -> bool:
        """Mark the claimed message done; False (and nothing changes) when the claim is from an older
        generation of its partition."""
        if claim.generation != self._generation.get(claim.tp, 0):
            return False
        pending = self._inflight.get(claim.tp)
        if pending is not None:
            pending.discard(claim.offset)
        return True

    @property
    def inflight(self) -> int:
        return sum(len(v) for v in self._inflight.values())

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets to commit now: the oldest unfinished offset, or the next one when all are done."""
        out: dict[TopicPartition, int] = {}
        for tp, nxt in self._next.items():
            pending = self._inflight.get(tp)
            offset = min(pending) if pending else nxt
            if self._committed.get(tp) != offset:
                out[tp] = offset
        return out

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop state for revoked partitions (their unfinished messages will be redelivered) and fence the
        claims made before."""
        for tp in partitions:
            self._inflight.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
            self._generation[tp] = self._generation.get(tp, 0) + 1


class BatchOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    """The offsets of a consumer that works a batch at a time (router, accounting), committed on demand and
    when its partitions are revoked.

    Only what a finished batch covered is ever committed, so a commit while a batch is in progress (the
    revocation runs beside the consumer's loop) never passes an unfinished message. On revocation it waits
    up to `revoke_wait_s` for the batch in progress, then commits: the next owner starts after what this
    member finished instead of redoing it; a batch that finishes only after that is not recorded (its
    partitions may be someone else's by then, who redoes it). Set as the listener of the subscription.
    """

    def __init__(self, consumer: AIOKafkaConsumer, revoke_wait_s: float = 5.0) -> None:
        self.consumer = consumer
        self.revoke_wait_s = revoke_wait_s
        self._done: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._batch: dict[TopicPartition, int] = {}
        self._generation = 0
        self._batch_generation = 0

    def begin(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """A batch (as `getmany` returned it) is being worked on."""
        self._batch = {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
        self._batch_generation = self._generation
        self._idle.clear()

    def done(self) -> None:
        """Everything the batch owes is acknowledged: its offsets may be committed."""
        if self._batch_generation == self._generation:
            self._done.update(self._batch)
        self._batch = {}
        self._idle.set()

    @property
    def dirty(self) -> bool:
        return any(self._committed.get(tp) != offset for tp, offset in self._done.items())

    async def commit(self) -> bool:
        assigned = self.consumer.assignment()
        offsets = {tp: o for tp, o in self._done.items() if tp in assigned and self._committed.get(tp) != o}
        if not offsets:
            return True
        if await commit(self.consumer, offsets):
            self._committed.update(offsets)
            return True
        return False

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        if not self._idle.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.revoke_wait_s)
        committed = await self.commit()
        log.info("partitions revoked", extra={"partitions": len(revoked), "committed": committed})
        self._generation += 1
        for tp in revoked:
            self._done.pop(tp, None)
            self._committed.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        pass
