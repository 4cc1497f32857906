"""The load generator: a small HTTP/1.1 keep-alive client on raw asyncio + httptools (uvloop).

Why not httpx or aiohttp: httpx spends ~0.3-0.5 ms of CPU per request in Python, which on a
2-core machine shared with the target would cap and distort what we measure. Here a request
is one pre-built bytes write and an httptools parse; `bench/run.py` shows it driving the fake
provider directly at many times the targets' rates (the "fake direct" row), so the client is
not what limits a target.

Scenarios (all latencies in ms, measured from the *intended* send time in open loop, so a
stalled target cannot hide its queueing — no coordinated omission):

- `closed_loop`: N connections, each sends its next request as soon as the previous answer
  arrives; gives max throughput.
- `open_loop`: requests start on a fixed schedule (constant spacing) at R req/s whatever the
  target does; a free keep-alive connection is used or a new one opened (up to `max_conns`).
- `sequential`: one connection, one request at a time; the latency floor (streaming too:
  time to first content token and to the end, with each stream's text checked for order).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import httptools
import orjson


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send chat completions to one target."""

    name: str
    host: str
    port: int
    model: str
    api_key: str | None = None
    path: str = "/v1/chat/completions"


PROMPT = "Benchmark request: answer briefly. The quick brown fox jumps over the lazy dog."


def build_request(ep: Endpoint, stream: bool) -> bytes:
    """The bytes of one request, built once per scenario (the client's per-request cost stays ~0)."""
    body: dict[str, Any] = {"model": ep.model, "messages": [{"role": "user", "content": PROMPT}],
                            "max_tokens": 64}
    if stream:
        body["stream"] = True
    raw = orjson.dumps(body)
    head = [f"POST {ep.path} HTTP/1.1", f"host: {ep.host}:{ep.port}", "content-type: application/json",
            f"content-length: {len(raw)}"]
    if ep.api_key:
        head.append(f"authorization: Bearer {ep.api_key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + raw


@dataclass
class Answer:
    """One response as the client saw it."""

    status: int = 0
    started: float = 0.0
    first_token: float | None = None
    done: float = 0.0
    body_bytes: int = 0
    text: list[str] = field(default_factory=list)
    events: int = 0


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Answer] | None = None
        self.answer = Answer()
        self.stream = False
        self.sse = b""
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, host, port)
        return proto

    def request(self, payload: bytes, stream: bool, started: float | None = None) -> asyncio.Future[Answer]:
        assert self.transport is not None and self.waiter is None
        self.waiter = asyncio.get_running_loop().create_future()
        self.answer = Answer(started=started if started is not None else time.perf_counter())
        self.stream = stream
        self.sse = b""
        self.transport.write(payload)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # ---- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ConnectionError(f"bad HTTP from target: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._fail(ConnectionError("connection closed by target"))

    # ---- httptools callbacks -------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.answer.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        a = self.answer
        a.body_bytes += len(body)
        if not self.stream:
            return
        self.sse += body
        while True:
            end = self.sse.find(b"\n\n")
            if end < 0:
                return
            event, self.sse = self.sse[:end], self.sse[end + 2:]
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                a.events += 1
                try:
                    chunk = orjson.loads(data)
                    choices = chunk.get("choices") or []
                    content = (choices[0].get("delta") or {}).get("content") if choices else None
                except (orjson.JSONDecodeError, AttributeError, IndexError):
                    content = None
                if content:
                    if a.first_token is None:
                        a.first_token = time.perf_counter()
                    a.text.append(content)

    def on_message_complete(self) -> None:
        self.answer.done = time.perf_counter()
        if not self.parser.should_keep_alive():
            self.close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self.answer)

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


# ---- statistics ------------------------------------------------------------------------------

def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values_ms: list[float]) -> dict[str, float]:
    s = sorted(values_ms)
    if not s:
        return {"n": 0}
    return {"n": len(s), "p50": round(percentile(s, 50), 3), "p90": round(percentile(s, 90), 3),
            "p99": round(percentile(s, 99), 3), "max": round(s[-1], 3), "mean": round(sum(s) / len(s), 3)}


@dataclass
class Tally:
    """What one scenario saw: latencies, stream timings, and every failure by kind."""

    latencies: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    bad_streams: int = 0
    connections: int = 0

    def record(self, a: Answer, stream: bool, expected_text: str | None) -> None:
        if a.status != 200:
            self.errors[f"http_{a.status}"] += 1
            return
        self.latencies.append((a.done - a.started) * 1000.0)
        if stream:
            if a.first_token is not None:
                self.ttft.append((a.first_token - a.started) * 1000.0)
            if expected_text is not None and "".join(a.text) != expected_text:
                self.bad_streams += 1

    def result(self, duration_s: float, stream: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": len(self.latencies), "errors": dict(self.errors),
                               "duration_s": round(duration_s, 3),
                               "rps": round(len(self.latencies) / duration_s, 1) if duration_s > 0 else 0.0,
                               "latency_ms": summarize(self.latencies), "connections": self.connections}
        if stream:
            out["ttft_ms"] = summarize(self.ttft)
            out["bad_streams"] = self.bad_streams
        return out


# ---- scenarios -------------------------------------------------------------------------------

async def closed_loop(ep: Endpoint, connections: int, duration_s: float, stream: bool = False,
                      expected_text: str | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
    """Max throughput: `connections` clients, each back to back, for `duration_s`."""
    payload = build_request(ep, stream)
    tally = Tally()
    conns = [await Conn.open(ep.host, ep.port) for _ in range(connections)]
    tally.connections = len(conns)
    start = time.perf_counter()
    deadline = start + duration_s

    async def client(i: int) -> None:
        conn = conns[i]
        while time.perf_counter() < deadline:
            try:
                if conn.closed:
                    conn = conns[i] = await Conn.open(ep.host, ep.port)
                    tally.connections += 1
                a = await asyncio.wait_for(conn.request(payload, stream), timeout_s)
                tally.record(a, stream, expected_text)
            except (TimeoutError, OSError, ConnectionError) as e:
                tally.errors[type(e).__name__] += 1
                conn.close()
                await asyncio.sleep(0.01)

    await asyncio.gather(*(client(i) for i in range(connections)))
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    return tally.result(elapsed, stream)


async def open_loop(ep: Endpoint, rate: float, duration_s: float, stream: bool = False,
                    expected_text: str | None = None, max_conns: int = 512, timeout_s: float = 30.0,
                    drain_s: float = 10.0) -> dict[str, Any]:
    """Fixed arrival rate: request i is due at start + i/rate, sent then whatever came before."""
    payload = build_request(ep, stream)
    tally = Tally()
    idle: list[Conn] = []
    total = 0
    slots = asyncio.Semaphore(max_conns)

    async def one(due: float) -> None:
        nonlocal total
        async with slots:
            conn = None
            try:
                while idle:
                    conn = idle.pop()
                    if not conn.closed:
                        break
                    conn = None
                if conn is None:
                    conn = await Conn.open(ep.host, ep.port)
                    total += 1
                a = await asyncio.wait_for(conn.request(payload, stream, started=due), timeout_s)
                tally.record(a, stream, expected_text)
                if not conn.closed:
                    idle.append(conn)
            except (TimeoutError, OSError, ConnectionError) as e:
                tally.errors[type(e).__name__] += 1
                if conn is not None:
                    conn.close()
            except asyncio.CancelledError:
                if conn is not None:  # drained: stop the target's work on it too
                    conn.close()
                raise

    n = max(1, int(rate * duration_s))
    start = time.perf_counter() + 0.01
    tasks = []
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due)))
    done, pending = await asyncio.wait(tasks, timeout=drain_s)
    for t in pending:
        t.cancel()
    if pending:
        tally.errors["unfinished_after_drain"] += len(pending)
    elapsed = time.perf_counter() - start
    for c in idle:
        c.close()
    tally.connections = total
    out = tally.result(elapsed, stream)
    out["offered_rps"] = rate
    out["sent"] = n
    return out


async def sequential(ep: Endpoint, duration_s: float, stream: bool = False, expected_text: str | None = None,
                     max_requests: int = 100_000, timeout_s: float = 30.0) -> dict[str, Any]:
    """One connection, one request at a time: the target's latency floor."""
    payload = build_request(ep, stream)
    tally = Tally()
    conn = await Conn.open(ep.host, ep.port)
    tally.connections = 1
    start = time.perf_counter()
    deadline = start + duration_s
    count = 0
    while time.perf_counter() < deadline and count < max_requests:
        count += 1
        try:
            if conn.closed:
                conn = await Conn.open(ep.host, ep.port)
                tally.connections += 1
            a = await asyncio.wait_for(conn.request(payload, stream), timeout_s)
            tally.record(a, stream, expected_text)
        except (TimeoutError, OSError, ConnectionError) as e:
            tally.errors[type(e).__name__] += 1
            conn.close()
    elapsed = time.perf_counter() - start
    conn.close()
    return tally.result(elapsed, stream)


async def one_request(ep: Endpoint, stream: bool = False, timeout_s: float = 30.0) -> Answer:
    """A single request on a fresh connection (warm-up and readiness checks)."""
    conn = await Conn.open(ep.host, ep.port)
    try:
        return await asyncio.wait_for(conn.request(build_request(ep, stream), stream), timeout_s)
    finally:
        conn.close()


async def wait_ready(ep: Endpoint, stream: bool = False, timeout_s: float = 60.0) -> None:
    """Until one request answers 200: the first ones wait for Kafka group joins and pool set-up."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            answer = await one_request(ep, stream=stream, timeout_s=30)
            if answer.status == 200:
                return
            last = f"HTTP {answer.status}"
        except OSError as e:
            last = repr(e)
        await asyncio.sleep(0.3)
    raise RuntimeError(f"{ep.name} never answered 200 ({last})")


async def warm_up(ep: Endpoint, stream: bool = False, seconds: float = 3.0) -> None:
    """Until the target answers (`wait_ready`), then a 50-connection closed loop for `seconds`: its pools and
    consumer groups are settled before anything is measured."""
    await wait_ready(ep, stream=stream)
    await closed_loop(ep, 50, seconds, stream=stream)
