"""Consumer lag per (group, topic), measured by each consumer process for the partitions it owns.

Every LAG_INTERVAL_S the process asks the broker for the end offsets of its partitions (one ListOffsets
round trip) and subtracts its own positions. Summed over the replicas of a group (`sum by (group, topic)`),
that is the backlog of the stage: what tells an operator which stage to scale. The position is the next
message to be read, so messages a worker holds in flight are not counted as lag.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from aiokafka import AIOKafkaConsumer, TopicPartition

from switchyard.shared.metrics import CONSUMER_LAG

log = logging.getLogger("switchyard.lag")
LAG_INTERVAL_S = 5.0


async def measure_lag(consumer: AIOKafkaConsumer, group: str) -> dict[str, int]:
    """Set `switchyard_consumer_lag{group, topic}` for the partitions `consumer` owns now; returns it."""
    parts = list(consumer.assignment())
    lag: dict[str, int] = defaultdict(int)
    if parts:
        ends = await consumer.end_offsets(parts)
        for tp in parts:
            position = _position(consumer, tp)
            if position is not None:
                lag[tp.topic] += max(0, ends.get(tp, position) - position)
    for topic in set(lag) | set(_topics.get(group, ())):
        CONSUMER_LAG.labels(group, topic).set(lag.get(topic, 0))
    _topics.setdefault(group, set()).update(lag)
    return dict(lag)


def _position(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The partition's position if the consumer knows it now (None while it is being reset or fetched).

    `AIOKafkaConsumer.position()` waits for an unknown position, up to the request timeout per partition,
    which would stall the measurement of every other partition; this reads the same state without waiting.
    """
    try:
        state = consumer._subscription.subscription.assignment.state_value(tp)
        return int(state.position) if state is not None and state.has_valid_position else None
    except (AttributeError, KeyError, TypeError):
        return None


_topics: dict[str, set[str]] = {}
"""Topics a group's gauge was set for: a partition that moved away reads 0 here, not its last value."""


async def follow_lag(consumer: AIOKafkaConsumer, group: str, interval_s: float = LAG_INTERVAL_S) -> None:
    """Measure lag until cancelled; a failed measurement is logged and tried again next interval."""
    while True:
        try:
            await asyncio.wait_for(measure_lag(consumer, group), timeout=max(interval_s, 10.0))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a rebalance mid-measure, a broker hiccup: the next interval tries again
            log.warning("could not measure consumer lag", extra={"group": group, "error": repr(e)[:200]})
        await asyncio.sleep(interval_s)
