"""Routing and failover through a real stack: `switchyard up --replicas router=2` on the embedded broker,
with fault-injecting fake providers (real HTTP servers). Which fake got a call, and when, is what
the tests look at; every caller-visible answer is checked too.

Each scenario has its own model group and its own fakes, so breaker state never leaks between tests.
The breaker cooldown is shortened to 2 s (SWITCHYARD_BREAKER_COOLDOWN_S) to keep the file quick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from aiokafka.partitioner import murmur2
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from switchyard.shared import topics
from switchyard.shared.contracts import AttemptEvent
from switchyard.shared.metrics import BREAKER_STATES
from switchyard.shared.settings import read_stack
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Recorded
from tests.stack import RunningStack, read_topic_until, start_stack, warm_up

COOLDOWN_S = 2.0
NAMES = ["warm", "down_primary", "down_secondary", "flap_primary", "flap_secondary", "limited", "spare",
         "slow", "quick", "shared_a", "shared_b", "late_a", "late_b", "busy_a", "busy_b"]
GROUPS = {  # group -> (strategy, fakes in order)
    "warm": ("fallback", ["warm"]),
    "down": ("fallback", ["down_primary", "down_secondary"]),
    "flappy": ("fallback", ["flap_primary", "flap_secondary"]),
    "limited": ("fallback", ["limited", "spare"]),
    "quickest": ("latency", ["slow", "quick"]),
    "shared": ("fallback", ["shared_a", "shared_b"]),
    "late": ("fallback", ["late_a", "late_b"]),
    "busy": ("least-busy", ["busy_a", "busy_b"]),
}


class Fakes(dict[str, FakeOpenAI]):
    def reset(self) -> None:
        for fake in self.values():
            fake.reset()


def _config(fakes: Fakes) -> str:
    lines = ["models:"]
    for group, (strategy, names) in GROUPS.items():
        lines += [f"  - name: {group}", f"    strategy: {strategy}", "    deployments:"]
        lines += [f"      - {{provider: openai, model: gpt-4o-mini, api_base: '{fakes[n].url}/v1', api_key: sk-{n}}}"
                  for n in names]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def route_fakes() -> Iterator[Fakes]:
    running = Fakes({name: FakeOpenAI().start() for name in NAMES})
    yield running
    for fake in running.values():
        fake.stop()


@pytest.fixture(scope="module")
def routing_stack(route_fakes: Fakes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    cwd: Path = tmp_path_factory.mktemp("routing-stack")
    running = start_stack(cwd, _config(route_fakes), args=("--replicas", "router=2"),
                          extra_env={"SWITCHYARD_BREAKER_COOLDOWN_S": str(COOLDOWN_S)})
    try:
        warm_up(running, "warm")
        yield running
    finally:
        code = running.stop()
        assert code == 0, f"switchyard up did not stop cleanly ({code}):\n{running.log()[-3000:]}"


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def _fresh_fakes(route_fakes: Fakes) -> None:
    route_fakes.reset()


def chat(stack: RunningStack, client: httpx.Client, model: str, content: str = "hi",
         headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post(f"{stack.url}/v1/chat/completions",
                       json={"model": model, "messages": [{"role": "user", "content": content}]},
                       headers={**stack.headers(), **(headers or {})})


def served_by(r: httpx.Response) -> str:
    """The deployment named by `x-switchyard-route: group=..; deployment=..; attempt=..`."""
    parts = dict(p.strip().split("=", 1) for p in r.headers[topics.HEADER_ROUTE].split(";"))
    return parts["deployment"]


def breaker_states(stack: RunningStack, deployment: str) -> dict[str, str | None]:
    """`deployment`'s breaker state as ingress holds it (the dashboard) and as each router holds it (its
    `switchyard_deployment_state` metric)."""
    names = {value: name for name, value in BREAKER_STATES.items()}
    rows = httpx.get(f"{stack.url}/v1/dashboard/providers", headers=stack.headers(), timeout=10).json()
    states: dict[str, str | None] = {
        "ingress": next((d["state"] for d in rows["deployments"] if d["deployment"] == deployment), None)}
    for name, url in stack.info["metrics_urls"].items():
        if name.startswith("router"):
            for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
                for sample in family.samples:
                    if sample.name == "switchyard_deployment_state" and sample.labels["deployment"] == deployment:
                        states[name] = names[int(sample.value)]
    return states


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def for_seconds(seconds: float, send: Callable[[int], httpx.Response],
                concurrency: int = 1) -> list[tuple[float, httpx.Response]]:
    """Keep `concurrency` callers sending for `seconds`; (time sent, response) for every request."""
    end = time.time() + seconds

    def caller(worker: int) -> list[tuple[float, httpx.Response]]:
        out = []
        i = worker
        while time.time() < end:
            sent = time.time()
            out.append((sent, send(i)))
            i += concurrency
        return out

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(caller, range(concurrency)))
    return sorted((x for r in results for x in r), key=lambda x: x[0])


def until(done: Callable[[], bool], send: Callable[[int], httpx.Response],
          limit_s: float = 20.0) -> list[httpx.Response]:
    """Send requests one after another until `done()` (or `limit_s` passed, which the caller then notices)."""
    end = time.time() + limit_s
    responses: list[httpx.Response] = []
    while not done() and time.time() < end:
        responses.append(send(len(responses)))
    return responses


def longest_quiet(calls: list[Recorded], start: float, end: float) -> tuple[float, float]:
    """The longest interval in [start, end] in which a fake received no call."""
    times = [start, *sorted(c.ts for c in calls if start <= c.ts <= end), end]
    return max(zip(times, times[1:], strict=False), key=lambda gap: gap[1] - gap[0])


# ---- scenarios --------------------------------------------------------------------------------


def test_primary_down_every_request_succeeds_via_the_secondary(routing_stack: RunningStack, route_fakes: Fakes,
                                                                client: httpx.Client) -> None:
    route_fakes["down_primary"].inject(status=503, times=10_000)
    start = time.time()
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda i: chat(routing_stack, client, "down", f"question {i}"), range(30)))
    elapsed = time.time() - start
    assert [r.status_code for r in responses] == [200] * 30, [r.text for r in responses if r.status_code != 200]
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == \
        [f"Echo: question {i}" for i in range(30)]
    assert {served_by(r) for r in responses} == {"down/1"}
    assert len(route_fakes["down_secondary"].calls()) == 30
    # The breaker opened: without it all 30 requests would have tried the primary first. With it, the
    # primary saw the 3 failures that opened it, what was in flight meanwhile, then one probe per router
    # per cooldown at most.
    assert len(route_fakes["down_primary"].calls()) <= 3 + 3 + 2 * (elapsed / COOLDOWN_S + 1)


def test_flapping_primary_opens_the_breaker_then_closes_it(routing_stack: RunningStack, route_fakes: Fakes,
                                                            client: httpx.Client) -> None:
    primary, secondary = route_fakes["flap_primary"], route_fakes["flap_secondary"]
    primary.inject(status=503, times=10_000)

    def probed_again() -> bool:
        calls = primary.calls()
        return len(calls) > 3 and calls[-1].ts >= calls[2].ts + COOLDOWN_S - 0.3

    start = time.time()
    down = until(probed_again, lambda i: chat(routing_stack, client, "flappy", f"down {i}"))
    assert all(r.status_code == 200 for r in down)
    assert probed_again(), "after its cooldown the open breaker never let a probe through"
    failed_calls = primary.calls()
    # Open: for about a cooldown after the third failure the primary got no call while the secondary served.
    quiet_from, quiet_to = longest_quiet(failed_calls, failed_calls[2].ts, failed_calls[-1].ts)
    assert quiet_to - quiet_from >= COOLDOWN_S - 0.3, [c.ts - start for c in failed_calls]
    assert sum(quiet_from < c.ts < quiet_to for c in secondary.calls()) >= 2

    primary.reset()  # the primary recovers; the next probe succeeds and closes the breaker
    recovered = until(lambda: len(primary.calls()) >= 6, lambda i: chat(routing_stack, client, "flappy", f"up {i}"))
    assert all(r.status_code == 200 for r in recovered)
    served = [served_by(r) for r in recovered]
    assert "flappy/0" in served, "the probe never reached the recovered primary"
    # Closed: once the probe's success has reached both routers (through llm.events, within about a second;
    # the other router may route a request or two to the secondary meanwhile), traffic stays on the primary.
    time.sleep(2.0)
    closed = [served_by(chat(routing_stack, client, "flappy", f"closed {i}")) for i in range(6)]
    assert closed == ["flappy/0"] * 6


def test_429_storm_with_retry_after_moves_traffic_and_no_429_reaches_the_caller(
        routing_stack: RunningStack, route_fakes: Fakes, client: httpx.Client) -> None:
    retry_after = 4.0
    route_fakes["limited"].inject(status=429, retry_after=retry_after, times=10_000)
    start = time.time()
    results = for_seconds(retry_after + 3, lambda i: chat(routing_stack, client, "limited", f"q{i}"), concurrency=4)
    end = time.time()
    assert [r.status_code for _, r in results] == [200] * len(results), \
        {r.status_code: r.text for _, r in results if r.status_code != 200}
    assert {served_by(r) for _, r in results} == {"limited/1"}
    limited = route_fakes["limited"].calls()
    assert limited, "the rate-limited deployment was never tried"
    # Retry-After (4 s), not the 2 s default cooldown, kept the deployment quiet while traffic flowed.
    quiet_from, quiet_to = longest_quiet(limited, limited[0].ts, end)
    assert quiet_to - quiet_from >= retry_after - 0.5, [c.ts - start for c in limited]
    assert sum(quiet_from < c.ts < quiet_to for c in route_fakes["spare"].calls()) >= 3


def test_latency_strategy_shifts_traffic_away_from_a_slow_deployment(routing_stack: RunningStack, route_fakes: Fakes,
                                                                     client: httpx.Client) -> None:
    route_fakes["quick"].inject(latency_ms=600, times=10_000)  # at first quickest/1 is the slower one
    first = [chat(routing_stack, client, "quickest", f"a{i}") for i in range(10)]
    assert all(r.status_code == 200 for r in first)
    assert [served_by(r) for r in first[-4:]] == ["quickest/0"] * 4, [served_by(r) for r in first]

    route_fakes.reset()
    route_fakes["slow"].inject(latency_ms=1500, times=10_000)  # now quickest/0 slows down
    later = [chat(routing_stack, client, "quickest", f"b{i}") for i in range(15)]
    assert all(r.status_code == 200 for r in later)
    assert [served_by(r) for r in later[-10:]] == ["quickest/1"] * 10, [served_by(r) for r in later]
    assert len(route_fakes["slow"].calls()) <= 5


def test_ingress_and_both_routers_share_cooldowns(routing_stack: RunningStack, route_fakes: Fakes,
                                                  client: httpx.Client) -> None:
    """Ingress routes every first attempt and the routers every retry: all of them keep out of the deployment
    that asked for 30 s, from the one event its worker published."""
    assert {"router-0", "router-1"} <= set(read_stack(routing_stack.cwd).get("children", {}))
    route_fakes["shared_a"].inject(status=429, retry_after=30, times=1)  # one 429, then it would answer fine
    first = chat(routing_stack, client, "shared", "first")
    assert first.status_code == 200
    assert served_by(first) == "shared/1"
    # The attempt event reaches ingress (its dashboard shows its own book) and both routers (their metric).
    wait_until(lambda: breaker_states(routing_stack, "shared/0") == {"ingress": "open", "router-0": "open",
                                                                     "router-1": "open"},
               "ingress and both routers to hold shared/0 open")

    with ThreadPoolExecutor(4) as pool:  # first attempts: ingress's decisions
        responses = list(pool.map(lambda i: chat(routing_stack, client, "shared", f"q{i}"), range(24)))
    assert [r.status_code for r in responses] == [200] * 24
    assert {served_by(r) for r in responses} == {"shared/1"}
    assert len(route_fakes["shared_a"].calls()) == 1, "ingress sent traffic to the deployment that asked for 30 s"

    # Retries: each of these fails once on shared/1, so a router picks its next attempt. shared/0 is the only
    # untried deployment; a router that did not know it is cooling down would send the retry there.
    # The retries must reach both routers: `switchyard up --replicas router=2` gives llm.requests two partitions,
    # one per router, and a retry is keyed by its request id (ingress's, random), so retry until both took some.
    partitions: set[int] = set()
    for i in range(60):
        route_fakes["shared_b"].inject(status=503, times=1)
        r = chat(routing_stack, client, "shared", f"retry {i}")
        assert r.status_code == 200, r.text
        assert served_by(r) == "shared/1" and r.headers[topics.HEADER_ROUTE].endswith("attempt=1")
        partitions.add((murmur2(r.headers[topics.HEADER_REQUEST_ID].encode()) & 0x7FFFFFFF) % 2)
        if i >= 11 and partitions == {0, 1}:
            break
    assert partitions == {0, 1}, "60 retries all went to one router's partition"
    assert len(route_fakes["shared_a"].calls()) == 1, "a router sent a retry to the deployment that asked for 30 s"


def test_deadline_exhausted_is_504_and_no_provider_is_called_after_it(routing_stack: RunningStack, route_fakes: Fakes,
                                                                      client: httpx.Client) -> None:
    route_fakes["late_a"].inject(latency_ms=5000, times=10)
    route_fakes["late_b"].inject(latency_ms=5000, times=10)
    timeout_s = 1.5
    sent = time.time()
    r = chat(routing_stack, client, "late", "slow please", headers={topics.HEADER_TIMEOUT: str(timeout_s)})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] in ("timeout", "upstream_timeout")
    time.sleep(1.5)  # anything still queued for this request would have called by now
    calls = route_fakes["late_a"].calls() + route_fakes["late_b"].calls()
    assert len(calls) >= 1
    assert all(c.ts < sent + timeout_s for c in calls), [c.ts - sent for c in calls]


def _attempt_events(messages: list[bytes]) -> list[AttemptEvent]:
    events = []
    for message in messages:
        try:
            events.append(AttemptEvent.model_validate_json(message))
        except ValidationError:
            continue
    return events


def _attempt_events_until_ended(stack: RunningStack, request_ids: set[str]) -> list[AttemptEvent]:
    """`llm.events` from its beginning, read until every one of `request_ids` has its `end` event."""
    def ended(messages: list[bytes]) -> bool:
        return request_ids <= {e.request_id for e in _attempt_events(messages) if e.phase == "end"}

    return _attempt_events(asyncio.run(read_topic_until(stack.bootstrap, topics.EVENTS, ended)))


def test_a_worker_announces_a_calls_start_only_where_routing_asked(routing_stack: RunningStack, client: httpx.Client,
                                                                   route_fakes: Fakes) -> None:
    """A least-busy group's call is announced on `llm.events` (every replica counts it in flight); a healthy
    fallback group's is not (no replica decides by it), and both still end with their outcome event. A start
    and an end of one deployment share a partition, so a start sent would be read before its end."""
    plain, busy = chat(routing_stack, client, "warm"), chat(routing_stack, client, "busy")
    assert plain.status_code == busy.status_code == 200, (plain.text, busy.text)
    plain_id, busy_id = plain.headers[topics.HEADER_REQUEST_ID], busy.headers[topics.HEADER_REQUEST_ID]
    events = _attempt_events_until_ended(routing_stack, {plain_id, busy_id})
    phases = {rid: [e.phase for e in events if e.request_id == rid] for rid in (plain_id, busy_id)}
    assert phases == {plain_id: ["end"], busy_id: ["start", "end"]}
    assert len(route_fakes["busy_a"].calls() + route_fakes["busy_b"].calls()) == 1
