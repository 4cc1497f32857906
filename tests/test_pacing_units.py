"""Pacing and offset tracking on a fake clock (issue 18): the window keeps its time order, shares never add up
to more than the limit, an interactive request that cannot start is handed back in time, a call's end wakes
one waiter. The offset tracker never commits past an unfinished message."""

from __future__ import annotations

import asyncio
from itertools import combinations

import pytest
from aiokafka import TopicPartition

from switchyard.services.workers.pacing import WINDOW_S, Pacer, part_of
from switchyard.shared.config_schema import Deployment
from switchyard.shared.contracts import RequestEnvelope, now_ms
from switchyard.shared.errors import GatewayError
from switchyard.shared.kafka_offsets import OffsetTracker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _dep(**limits: int) -> Deployment:
    return Deployment(provider="openai", model="m", id="d", api_key="k", **limits)  # type: ignore[arg-type]


def _env(priority: str = "interactive", deadline_s: float = 600) -> RequestEnvelope:
    return RequestEnvelope(id="r", kind="chat", model="g", body={"messages": [{"role": "user", "content": "hi"}],
                                                               "max_tokens": 10},
                           reply_topic="t", reply_partition=0, deadline_ms=now_ms() + int(deadline_s * 1000),
                           key_id="k", priority=priority)  # type: ignore[arg-type]


def test_a_long_call_at_the_head_does_not_stop_the_window_expiring() -> None:
    """A call that ran 50 s then ended must not keep short calls that ended before it in the window."""
    clock = Clock()
    pacer = Pacer(clock=clock)
    dep = _dep(rpm=3)

    async def run() -> None:
        long = pacer.slot(dep, _env("batch"))
        await long.__aenter__()  # starts first, ends last
        for _ in range(2):
            async with pacer.slot(dep, _env("batch")):
                pass
        clock.now += 50
        await long.__aexit__(None, None, None)
        clock.now += WINDOW_S - 49  # the two short calls are out of the window; the long one is in it
        kp = pacer._pace(dep).keys[0]
        assert pacer._free_in(kp, pacer.limits(dep), 1, clock.now) == 0
        assert kp.calls() == 1

    asyncio.run(run())


@pytest.mark.parametrize("limit", [1, 3, 7, 16, 17, 100, 601])
def test_the_parts_of_any_split_of_partitions_add_up_to_the_limit(limit: int) -> None:
    partitions = 16
    for workers in (1, 2, 3, 5):
        owned = [[p for p in range(partitions) if p % workers == w] for w in range(workers)]
        assert sum(part_of(limit, o, partitions) for o in owned) == limit
    for split in combinations(range(partitions), 5):  # any owner's part is within one unit per partition
        assert part_of(limit, split, partitions) <= limit


def test_a_process_that_owns_nothing_during_a_rebalance_starts_nothing() -> None:
    pacer = Pacer(owned=lambda: [], partitions=16)
    assert pacer.limits(_dep(rpm=600, tpm=1000, max_concurrent=8)) == type(pacer.limits(_dep()))(0, 0, 0)


def test_an_interactive_request_that_cannot_start_is_handed_back_before_its_deadline() -> None:
    """Concurrency is full and stays full: the request gets a retryable 429 after its wait, with most of its
    deadline left (before, it waited until the deadline and left the router no time)."""
    clock = Clock()
    pacer = Pacer(clock=clock, interactive_wait_s=0.05)
    dep = _dep(max_concurrent=1)

    async def run() -> GatewayError:
        busy = pacer.slot(dep, _env("batch"))
        await busy.__aenter__()
        try:
            async with asyncio.timeout(10):  # a hang guard, not a speed assertion
                with pytest.raises(GatewayError) as raised:
                    async with pacer.slot(dep, _env("interactive", deadline_s=600)):
                        pass
            return raised.value
        finally:
            await busy.__aexit__(None, None, None)

    error = asyncio.run(run())
    assert error.status == 429 and error.code == "rate_limit_exceeded" and error.retryable


def test_a_call_end_wakes_one_waiter_and_they_start_in_order() -> None:
    pacer = Pacer()
    dep = _dep(max_concurrent=1)
    order: list[int] = []

    async def run() -> None:
        first = pacer.slot(dep, _env("batch"))
        await first.__aenter__()

        async def waiter(i: int) -> None:
            async with pacer.slot(dep, _env("batch")):
                order.append(i)

        tasks = [asyncio.create_task(waiter(i)) for i in range(5)]
        await asyncio.sleep(0)
        pace = pacer._pace(dep)
        assert len(pace.waiters[False]) == 5
        await first.__aexit__(None, None, None)
        woken = [f for f in pace.waiters[False] if f.done()]
        assert len(woken) == 1  # only the head
        await asyncio.gather(*tasks)

    asyncio.run(run())
    assert order == [0, 1, 2, 3, 4]


def test_token_usage_corrected_after_the_call_counts_in_the_window() -> None:
    clock = Clock()
    pacer = Pacer(clock=clock)
    dep = _dep(tpm=1000)

    async def run() -> float:
        async with pacer.slot(dep, _env("batch")) as lease:
            pacer.record_usage(lease, 900)
        kp = pacer._pace(dep).keys[0]
        assert kp.tokens() == 900
        return pacer._free_in(kp, pacer.limits(dep), 200, clock.now)

    assert asyncio.run(run()) == pytest.approx(WINDOW_S)


def test_the_offset_tracker_never_commits_past_an_unfinished_message() -> None:
    tp = TopicPartition("t", 0)
    tracker = OffsetTracker()
    claims = [tracker.started(tp, offset) for offset in range(5)]
    for i in (4, 2, 1):
        tracker.finished(claims[i])
    assert tracker.committable() == {tp: 0}
    tracker.finished(claims[0])
    assert tracker.committable() == {tp: 3}
    tracker.mark_committed({tp: 3})
    assert tracker.committable() == {}
    tracker.finished(claims[3])
    assert tracker.committable() == {tp: 5}


def test_a_claim_from_before_a_revocation_does_not_finish_the_new_owners_message() -> None:
    tp = TopicPartition("t", 0)
    tracker = OffsetTracker()
    old = tracker.started(tp, 7)
    tracker.forget([tp])
    tracker.started(tp, 7)
    assert tracker.finished(old) is False
    assert tracker.committable() == {tp: 7}


def test_a_deployment_without_rate_limits_keeps_no_window() -> None:
    """Calls to a deployment with neither RPM nor TPM leave nothing behind (the window would hold a minute of
    calls for nothing); its concurrency limit still holds, and a limited deployment still counts its calls."""
    clock = Clock()
    pacer = Pacer(clock=clock)
    free, limited = _dep(max_concurrent=1), Deployment(provider="openai", model="m", id="e", api_key="k", rpm=5)

    async def run() -> None:
        for _ in range(3):
            async with pacer.slot(free, _env()), pacer.slot(limited, _env()):
                pass
        assert not pacer._pace(free).keys[0].ended
        assert pacer._pace(limited).keys[0].calls() == 3
        held = pacer.slot(free, _env())
        await held.__aenter__()
        with pytest.raises(GatewayError):  # the one concurrent slot is taken; the wait gives up in time
            async with pacer.slot(free, _env(deadline_s=0.01)):
                pass
        await held.__aexit__(None, None, None)

    asyncio.run(run())
