"""Chaos run: SIGKILL the services of a multi-process `switchyard up` under steady load, then audit.

The long version of tests/test_chaos.py (which runs the same code with a short plan in CI).
It starts its own stack (embedded Apache Kafka and PostgreSQL, `--replicas ingress=2,router=2,
worker=2` by default) in front of a fake OpenAI server that counts every call, and then, while
HTTP requests (plain and streamed, spread over every ingress port) and a batch job (through the
request topic, `switchyard.batch.run_batch`) keep flowing:

- SIGKILLs routers, workers, accounting and ingress replicas (the supervisor restarts them;
  callers of a killed ingress see a connection error and retry on another port);
- SIGKILLs the broker (Apache Kafka only): the supervisor restarts it on the same address, it
  recovers its log from disk, and nothing it acknowledged may be lost;
- stops PostgreSQL (`pg_ctl stop` on .switchyard/pg) for a while and starts it again;
- at the end, kills the embedded broker once more, with no load: the services must serve again
  without a manual step (on the Tansu fallback, what the in-memory broker held is lost).

The audit compares what callers saw, what the fake provider was asked, and the `usage` table.

Run the long version (about 7 minutes on 2 cores):

    .venv/bin/python bench/chaos.py                  # writes bench/results/chaos-<date>.json
    .venv/bin/python bench/chaos.py --duration 120 --rps 10 --kill-every 6 --pg-outages 2

Counts in the JSON: `sent` (HTTP requests plus batch lines), `answered` (200s and batch results
with status 200), `lost` (sent but never answered: HTTP requests that gave up after retries, batch
lines without a result), `duplicate_usage_rows` (extra usage rows for one request attempt that are
not marked `redelivered`), and the detail behind them. Nothing here asserts; the test does.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, when run as a script

from switchyard.batch import run_batch
from switchyard.devstack.postgres import EmbeddedPostgres
from switchyard.shared.settings import read_stack
from tests.fakes.openai_fake import FakeOpenAI
from tests.stack import MASTER_KEY, RunningStack, start_stack

MODEL = "gpt-chaos"
SLOW_MODEL = "gpt-chaos-slow"
"""Same provider and worker pool, but each call takes `Plan.slow_latency_ms`: what a worker kill must catch."""
RESULTS = Path(__file__).resolve().parent / "results"
KILLABLE = ("router", "worker", "accounting", "ingress")


@dataclass
class Plan:
    """What a chaos run does, on a clock that starts when the steady load starts."""

    duration_s: float = 36.0
    rps: float = 8.0
    stream_share: float = 0.25
    batch_lines: int = 40
    batch_at_s: float = 1.0
    kills: list[tuple[float, str]] = field(default_factory=lambda: [
        (4.0, "worker-openai-0"), (9.0, "ingress-1"), (14.0, "router-0"), (18.0, "accounting-0")])
    pg_outages: list[tuple[float, float]] = field(default_factory=lambda: [(2.0, 30.0)])
    """(start, length) in seconds: PostgreSQL is stopped for `length` seconds."""
    replicas: str = "ingress=2,router=2,worker=2"
    request_timeout_s: float = 60.0
    """The gateway deadline each request asks for (x-switchyard-timeout): bounds any wait."""
    provider_latency_ms: int = 400
    """Every provider call takes this long, so kills land on calls in flight."""
    slow_burst: int = 12
    """Before each worker kill, this many requests for SLOW_MODEL are started and the kill waits until the
    provider has them all: so the killed worker surely dies mid-call, and the surviving one is mid-call
    when the group rebalances."""
    slow_latency_ms: int = 12000
    virtual_key_rpm: int | None = 2000
    """Every other request uses a virtual key with this RPM limit (None: master key only). Its replicas
    reserve 5% blocks of the limit in PostgreSQL, so during the outage they must run on their own count."""
    min_kill_gap_s: float = 3.0
    broker_kill_at_s: float | None = 24.0
    """When the broker is SIGKILLed under load (Apache Kafka only: Tansu loses what it held, by design)."""
    broker_restart: bool = True
    drain_timeout_s: float = 60.0
    seed: int = 7


def long_plan(duration_s: float = 300.0, rps: float = 12.0, kill_every_s: float = 7.0, pg_outages: int = 3,
              seed: int = 7) -> Plan:
    """The bench's plan: a kill every few seconds, round-robin over stages and replicas, and PG outages."""
    rng = random.Random(seed)
    names = ["router-0", "worker-openai-0", "ingress-0", "accounting-0", "router-1", "worker-openai-1", "ingress-1",
             "worker-openai-2"]
    kills: list[tuple[float, str]] = []
    t = 5.0
    while t < duration_s - 10:
        kills.append((round(t, 1), names[len(kills) % len(names)]))
        t += kill_every_s * rng.uniform(0.7, 1.3)
    outages = [(duration_s * (i + 0.5) / (pg_outages + 0.5), 30.0) for i in range(pg_outages)]
    return Plan(duration_s=duration_s, rps=rps, batch_lines=400, batch_at_s=2.0, kills=kills, pg_outages=outages,
                replicas="ingress=2,router=2,worker=3", seed=seed, min_kill_gap_s=kill_every_s * 0.6,
                broker_kill_at_s=round(duration_s * 0.6, 1))


# ---- the stack under test -------------------------------------------------------------------------


def config_yaml(fake: FakeOpenAI, latency_ms: int, slow_latency_ms: int = 12000) -> str:
    """Two model groups on the one fake, told apart by the latency each deployment asks the fake for."""
    groups = []
    for name, latency in ((MODEL, latency_ms), (SLOW_MODEL, slow_latency_ms)):
        groups.append(f"""
  - name: {name}
    deployments:
      - provider: openai
        model: gpt-4o-mini
        api_base: {fake.url}/v1
        api_key: sk-chaos
        headers:
          x-fake-fault: '{json.dumps({"latency_ms": latency})}'
""")
    return "models:" + "".join(groups)


def ingress_urls(stack: RunningStack) -> list[str]:
    return list(stack.info.get("ingress_urls") or [stack.url])


def children(stack: RunningStack) -> dict[str, int]:
    """Child name -> pid, as the supervisor last wrote them to stack.json; the embedded broker is `broker`."""
    info = read_stack(stack.cwd)
    pids = {str(k): int(v) for k, v in (info.get("children") or {}).items()}
    if info.get("broker"):
        pids["broker"] = int(info["broker"]["pid"])
    return pids


def pg_for(stack: RunningStack) -> EmbeddedPostgres:
    """The stack's embedded PostgreSQL, driven with the same pg_ctl calls `switchyard up` uses."""
    info = read_stack(stack.cwd)["postgres"]
    return EmbeddedPostgres(Path(info["data"]).parent, int(info["port"]))


def chat_body(tag: str, stream: bool, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": f"question {tag}"}], "user": tag,
            "stream": stream}


# ---- callers ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One caller's request, across its retries (a retry is a new gateway request)."""

    n: int
    stream: bool
    model: str = MODEL
    virtual_key: bool = False
    status: int | None = None
    request_id: str | None = None
    tries: int = 0
    connection_errors: int = 0
    retried_statuses: list[int] = field(default_factory=list)
    trail: list[str] = field(default_factory=list)
    """Each try: seconds since the load started, the port, and how it ended (for the lost ones' detail)."""
    right_answer: bool = False
    error: str | None = None
    seconds: float = 0.0


class _RetryAfter(Exception):
    def __init__(self, status: int, seconds: float) -> None:
        super().__init__(status, seconds)
        self.status, self.seconds = status, seconds


def _raise_if_retry_after(r: httpx.Response) -> None:
    if r.status_code in (429, 503) and "retry-after" in r.headers:
        raise _RetryAfter(r.status_code, float(r.headers["retry-after"]))


class Traffic:
    """Open-loop load: a request starts every 1/rps seconds whatever the earlier ones are doing.

    A connection error (the ingress replica died, or is not up yet) is retried on the next port:
    what a caller behind a load balancer would see. A 429 or 503 with Retry-After is retried after
    that long, as the OpenAI SDKs do; any other status is final.
    """

    RETRY_FOR_S = 90.0
    """How long a caller keeps retrying connection errors (and 503/429 with Retry-After) before giving up."""

    def __init__(self, urls: list[str], plan: Plan, keys: list[str]) -> None:
        self.urls = urls
        self.plan = plan
        self.keys = keys
        """Bearer keys used in turn: the master key, and a virtual key when the plan has one."""
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=96, thread_name_prefix="caller")
        self._client = httpx.Client(timeout=plan.request_timeout_s + 30,
                                    limits=httpx.Limits(max_connections=128, max_keepalive_connections=32))
        self._thread = threading.Thread(target=self._generate, name="traffic", daemon=True)
        self._rng = random.Random(plan.seed)
        self._extra = 0
        self.t0 = time.monotonic()

    def start(self) -> None:
        self.t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """Stop starting requests and wait for those in flight to end."""
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)
        self._client.close()

    def burst(self, count: int, model: str) -> None:
        """Start `count` extra requests at once (not paced), e.g. slow ones a kill should catch in flight."""
        for _ in range(count):
            with self._lock:
                self._extra += 1
                n = 1_000_000 + self._extra
            self._pool.submit(self._one, n, False, model)

    def _generate(self) -> None:
        interval = 1.0 / self.plan.rps
        start = time.monotonic()
        n = 0
        while not self._stop.is_set():
            stream = self._rng.random() < self.plan.stream_share
            self._pool.submit(self._one, n, stream)
            n += 1
            self._stop.wait(max(0.0, start + n * interval - time.monotonic()))

    def _one(self, n: int, stream: bool, model: str = MODEL) -> None:
        key = self.keys[n % len(self.keys)]
        headers = {"authorization": f"Bearer {key}", "x-switchyard-timeout": str(self.plan.request_timeout_s)}
        outcome = Outcome(n, stream, model, virtual_key=n % len(self.keys) == 1)
        began = time.monotonic()
        tag = f"chaos-{n}"
        attempt = -1
        while time.monotonic() - began < self.RETRY_FOR_S:
            attempt += 1
            url = self.urls[(n + attempt) % len(self.urls)]
            outcome.tries += 1
            outcome.trail.append(f"{time.monotonic() - self.t0:.1f}s :{url.rsplit(':', 1)[1]}")
            try:
                if stream:
                    self._streamed(url, tag, outcome, headers)
                else:
                    r = self._client.post(f"{url}/v1/chat/completions", headers=headers,
                                          json=chat_body(tag, False, model))
                    outcome.status, outcome.request_id = r.status_code, r.headers.get("x-request-id")
                    _raise_if_retry_after(r)
                    if r.status_code == 200:
                        outcome.right_answer = r.json()["choices"][0]["message"]["content"] == f"Echo: question {tag}"
                    else:
                        outcome.error = r.text[:300]
                break
            except _RetryAfter as e:
                outcome.retried_statuses.append(e.status)
                time.sleep(min(5.0, e.seconds))
                continue
            except httpx.TransportError as e:
                outcome.connection_errors += 1
                outcome.status, outcome.error = None, repr(e)[:300]
                outcome.trail[-1] += f" {type(e).__name__} after {time.monotonic() - self.t0:.1f}s"
                time.sleep(0.3)
        outcome.seconds = time.monotonic() - began
        with self._lock:
            self.outcomes.append(outcome)

    def _streamed(self, url: str, tag: str, outcome: Outcome, headers: dict[str, str]) -> None:
        with self._client.stream("POST", f"{url}/v1/chat/completions", headers=headers,
                                 json=chat_body(tag, True)) as r:
            outcome.status, outcome.request_id = r.status_code, r.headers.get("x-request-id")
            _raise_if_retry_after(r)
            if r.status_code != 200:
                outcome.error = r.read().decode(errors="replace")[:300]
                return
            text, done, failed = [], False, None
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = orjson.loads(line[6:])
                if "error" in event:
                    failed = event["error"]
                for choice in event.get("choices") or []:
                    text.append((choice.get("delta") or {}).get("content") or "")
            if failed is not None:
                outcome.status, outcome.error = 599, f"stream ended with an error: {failed}"[:300]
            outcome.right_answer = done and failed is None and "".join(text) == f"Echo: question {tag}"


class Batch:
    """A batch job through the request topic, in a thread of its own (run_batch is asyncio)."""

    def __init__(self, stack: RunningStack, lines: int, workdir: Path) -> None:
        self.stack = stack
        self.lines = lines
        self.in_path = workdir / "chaos-batch.in.jsonl"
        self.out_path = workdir / "chaos-batch.out.jsonl"
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="batch", daemon=True)

    def start(self) -> None:
        rows = [{"custom_id": f"b-{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": MODEL, "messages": [{"role": "user", "content": f"batch item {i}"}]}}
                for i in range(self.lines)]
        self.in_path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
        self._thread.start()

    def _run(self) -> None:
        try:
            asyncio.run(run_batch(self.in_path, self.out_path, self.stack.bootstrap, quiet=True))
        except Exception as e:  # noqa: BLE001 - reported in the results, not raised in a thread
            self.error = repr(e)

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def results(self) -> list[dict[str, Any]]:
        if not self.out_path.exists():
            return []
        return [orjson.loads(line) for line in self.out_path.read_bytes().splitlines() if line.strip()]


# ---- chaos actions ------------------------------------------------------------------------------


def kill_child(stack: RunningStack, name: str, wait_s: float = 60.0) -> dict[str, Any]:
    """SIGKILL one child by its supervisor name and wait until the supervisor has started a new one.

    For an ingress replica, a thread also records when the new process answers /ready (`ready_s`).
    """
    old = children(stack)[name]
    began = time.monotonic()
    os.kill(old, signal.SIGKILL)
    new = None
    while time.monotonic() - began < wait_s:
        pid = children(stack).get(name)
        if pid is not None and pid != old:
            new = pid
            break
        time.sleep(0.05)
    result: dict[str, Any] = {"target": name, "old_pid": old, "new_pid": new,
                              "restart_s": round(time.monotonic() - began, 2), "ready_s": None}
    if name.startswith("ingress-"):
        url = ingress_urls(stack)[int(name.rsplit("-", 1)[1])]
        threading.Thread(target=_record_ready, args=(url, began, result, wait_s), daemon=True).start()
    return result


def _record_ready(url: str, began: float, result: dict[str, Any], wait_s: float) -> None:
    while time.monotonic() - began < wait_s:
        try:
            if httpx.get(f"{url}/ready", timeout=1.0).status_code == 200:
                result["ready_s"] = round(time.monotonic() - began, 2)
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def slow_calls(fake: FakeOpenAI, plan: Plan) -> int:
    """Calls the fake received for SLOW_MODEL (its deployment asks the fake for the slow latency)."""
    mark = f'"latency_ms": {plan.slow_latency_ms}'
    return sum(1 for r in fake.calls("/chat/completions") if mark in r.headers.get("x-fake-fault", ""))


def pg_outage(stack: RunningStack, length_s: float, log: list[dict[str, Any]], t0: float) -> None:
    """`pg_ctl stop -m fast` on the stack's data folder, wait, then start it again as `up` does.

    Logs when it was down and back, in seconds since `t0` (the start of the load).
    """
    pg = pg_for(stack)
    began = time.monotonic()
    pg.stop()
    down = time.monotonic()
    time.sleep(max(0.0, length_s - (down - began)))
    pg.start()
    up = time.monotonic()
    log.append({"stopped_s": round(up - began, 1), "down_at_s": round(down - t0, 1), "up_at_s": round(up - t0, 1)})


# ---- the audit ----------------------------------------------------------------------------------


async def _usage_rows(database_url: str) -> list[dict[str, Any]]:
    from sqlalchemy import text

    from switchyard.shared.db import make_engine

    engine = make_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text(
                "SELECT event_id, request_id, attempt, call_seq, ok, status, redelivered, priority, ts FROM usage"))
            return [dict(r) for r in result.mappings()]
    finally:
        await engine.dispose()


def usage_rows(stack: RunningStack, exclude: set[str] | None = None) -> list[dict[str, Any]]:
    rows = asyncio.run(_usage_rows(stack.database_url))
    return [r for r in rows if not exclude or r["event_id"] not in exclude]


def provider_calls(fake: FakeOpenAI) -> int:
    return len(fake.calls("/chat/completions"))


def drain(stack: RunningStack, fake: FakeOpenAI, exclude: set[str], timeout_s: float,
          answered: AbstractSet[str] = frozenset()) -> list[dict[str, Any]]:
    """Wait until the usage table holds a row for every call the fake provider got, and an outcome for every
    answered request (a row is stored "in doubt" before its call and completed after it), and stays so."""
    deadline = time.monotonic() + timeout_s
    rows: list[dict[str, Any]] = []
    stable = 0
    while time.monotonic() < deadline:
        rows = usage_rows(stack, exclude)
        calls = provider_calls(fake)
        done = {r["request_id"] for r in rows if r["ok"]}
        stable = stable + 1 if len(rows) >= calls and answered <= done else 0
        if stable >= 3:
            break
        time.sleep(0.5)
    return rows


def audit(outcomes: list[Outcome], batch: Batch | None, rows: list[dict[str, Any]], calls: int) -> dict[str, Any]:
    """Compare what callers saw, the provider's own count and the usage table."""
    by_request: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_call: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_request[row["request_id"]].append(row)
        by_call[(row["request_id"], row["attempt"], row["call_seq"])].append(row)
    answered = [o for o in outcomes if o.status == 200]
    statuses = Counter(str(o.status) for o in outcomes if o.status not in (None, 200))
    lost = [o for o in outcomes if o.status is None]
    answered_without_usage = [o.request_id for o in answered
                              if not any(r["ok"] for r in by_request.get(o.request_id or "", []))]
    # One call of a request attempt is one provider call; more calls for it come from at-least-once
    # redelivery and must be marked as such. An extra row that is not marked is a duplicate.
    duplicates = sum(max(0, sum(1 for r in group if not r["redelivered"]) - 1) for group in by_call.values())
    ok_twice_unmarked = [rid for (rid, _, _), group in by_call.items()
                         if sum(1 for r in group if r["ok"] and not r["redelivered"]) > 1]
    in_doubt = sum(1 for r in rows if r["status"] == 0)
    http = {"sent": len(outcomes), "answered": len(answered), "errors": dict(statuses), "lost": len(lost),
            "wrong_answers": sum(1 for o in answered if not o.right_answer),
            "connection_errors": sum(o.connection_errors for o in outcomes),
            "retried": sum(1 for o in outcomes if o.tries > 1),
            "retried_statuses": dict(Counter(str(s) for o in outcomes for s in o.retried_statuses)),
            "streamed": sum(1 for o in outcomes if o.stream),
            "slow": sum(1 for o in outcomes if o.model == SLOW_MODEL),
            "virtual_key": sum(1 for o in outcomes if o.virtual_key),
            "max_seconds": round(max((o.seconds for o in outcomes), default=0.0), 2),
            "lost_detail": [asdict(o) for o in lost[:10]],
            "error_detail": [asdict(o) for o in outcomes if o.status not in (None, 200)][:10]}
    batch_report: dict[str, Any] = {"sent": 0, "results": 0, "ok": 0, "missing": 0, "duplicate_results": 0}
    batch_ok_without_usage: list[str] = []
    if batch is not None:
        results = batch.results()
        per_id = Counter(r["custom_id"] for r in results)
        ok = [r for r in results if r["response"]["status_code"] == 200]
        batch_ok_without_usage = [r["response"]["request_id"] for r in ok
                                  if not any(u["ok"] for u in by_request.get(r["response"]["request_id"], []))]
        batch_report = {"sent": batch.lines, "results": len(results), "ok": len(ok),
                        "missing": sum(1 for i in range(batch.lines) if per_id[f"b-{i}"] == 0),
                        "duplicate_results": sum(n - 1 for n in per_id.values() if n > 1), "error": batch.error}
    return {
        "sent": http["sent"] + batch_report["sent"],
        "answered": http["answered"] + batch_report["ok"],
        "lost": http["lost"] + batch_report["missing"],
        "duplicate_usage_rows": duplicates,
        "http": http,
        "batch": batch_report,
        "usage_rows": len(rows),
        "ok_rows": sum(1 for r in rows if r["ok"]),
        "in_doubt_rows": in_doubt,
        "redelivered_rows": sum(1 for r in rows if r["redelivered"]),
        "provider_calls": calls,
        "calls_without_usage_row": max(0, calls - len(rows)),
        "usage_rows_without_call": max(0, len(rows) - calls),
        "answered_without_usage": answered_without_usage[:20],
        "answered_without_usage_count": len(answered_without_usage) + len(batch_ok_without_usage),
        "batch_ok_without_usage": batch_ok_without_usage[:20],
        "ok_twice_unmarked": ok_twice_unmarked[:20],
    }


# ---- the broker restart -----------------------------------------------------------------------


def broker_restart(stack: RunningStack, fake: FakeOpenAI, exclude: set[str], workdir: Path,
                   timeout_s: float = 90.0) -> dict[str, Any]:
    """Kill the embedded broker; measure how long until every ingress port answers and usage is stored again.

    Requests in flight when the broker dies are lost with it (in memory, by design); each probe
    asks for a short deadline so such a request ends as a 504 instead of holding the probe.
    """
    old = int(read_stack(stack.cwd)["broker"]["pid"])
    began = time.monotonic()
    os.kill(old, signal.SIGKILL)
    report: dict[str, Any] = {"old_pid": old, "new_pid": None, "ports": {}}
    while time.monotonic() - began < timeout_s:
        pid = int((read_stack(stack.cwd).get("broker") or {}).get("pid") or 0)
        if pid and pid != old:
            report["new_pid"], report["broker_back_s"] = pid, round(time.monotonic() - began, 2)
            break
        time.sleep(0.05)
    answered: list[str] = []
    headers = {**stack.headers(), "x-switchyard-timeout": "5"}
    with httpx.Client(timeout=30) as client:
        for url in ingress_urls(stack):
            first_ok = None
            probes = 0
            while time.monotonic() - began < timeout_s and first_ok is None:
                probes += 1
                try:
                    r = client.post(f"{url}/v1/chat/completions", headers=headers,
                                    json=chat_body(f"after-restart-{probes}", False))
                    if r.status_code == 200:
                        first_ok = round(time.monotonic() - began, 2)
                        answered.append(r.headers["x-request-id"])
                except httpx.TransportError:
                    time.sleep(0.5)
            report["ports"][url] = {"first_200_s": first_ok, "probes": probes}
        after = []
        steady = {**headers, "x-switchyard-timeout": "20"}  # once serving, a late group join may still pause it
        for i in range(10):
            r = client.post(f"{ingress_urls(stack)[i % len(ingress_urls(stack))]}/v1/chat/completions",
                            headers=steady, json=chat_body(f"steady-{i}", False))
            after.append(r.status_code)
            if r.status_code == 200:
                answered.append(r.headers["x-request-id"])
    report["after_statuses"] = dict(Counter(str(s) for s in after))
    batch = Batch(stack, 10, workdir)
    batch.in_path = workdir / "after-restart.in.jsonl"
    batch.out_path = workdir / "after-restart.out.jsonl"
    batch.start()
    report["batch_finished"] = batch.join(60.0)
    results = batch.results()
    report["batch_results"] = len(results)
    report["batch_ok"] = sum(1 for r in results if r["response"]["status_code"] == 200)
    answered += [r["response"]["request_id"] for r in results if r["response"]["status_code"] == 200]
    deadline = time.monotonic() + 30
    stored: set[str] = set()
    while time.monotonic() < deadline:
        stored = {r["request_id"] for r in usage_rows(stack, exclude) if r["ok"]}
        if all(rid in stored for rid in answered):
            break
        time.sleep(0.5)
    report["answered_after_restart"] = len(answered)
    report["answered_without_usage"] = [rid for rid in answered if rid not in stored]
    report["recovered_s"] = round(time.monotonic() - began, 2)
    return report


# ---- the whole run ----------------------------------------------------------------------------


def warm_all(stack: RunningStack, timeout_s: float = 90.0) -> None:
    """Every ingress port answers (so every router and worker has joined its group)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=30) as client:
        for url in ingress_urls(stack):
            ok = 0
            while ok < 3:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not answer; log:\n{stack.log()[-3000:]}")
                try:
                    r = client.post(f"{url}/v1/chat/completions", headers=stack.headers(),
                                    json=chat_body("warm-up", False))
                    ok += r.status_code == 200
                except httpx.TransportError:
                    pass
                if ok < 3:
                    time.sleep(0.2)


def _start(workdir: Path, config: str, replicas: str) -> RunningStack:
    """`switchyard up --replicas ...`; once more if a replica's port (`--port` + i) was taken by chance.

    The harness picks a free port for the first ingress replica only; another program on the machine
    may hold the next one. That is the machine's doing, not the gateway's, so it is retried.
    """
    for attempt in range(3):
        cwd = workdir / f"stack{attempt or ''}"
        try:
            return start_stack(cwd, config, args=("--replicas", replicas), timeout_s=300)
        except RuntimeError:
            logs = (cwd / ".switchyard" / "logs").glob("ingress-*.log")
            if not any("address already in use" in log.read_text(errors="replace") for log in logs):
                raise
    raise RuntimeError("could not find free ports for the ingress replicas")


def run_chaos(plan: Plan, workdir: Path, say: Any = print) -> dict[str, Any]:
    """Start a stack, run the plan, audit, restart the broker, stop the stack; returns the report."""
    workdir.mkdir(parents=True, exist_ok=True)
    fake = FakeOpenAI().start()
    stack = _start(workdir, config_yaml(fake, plan.provider_latency_ms, plan.slow_latency_ms), plan.replicas)
    began_all = time.monotonic()
    report: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "plan": asdict(plan),
                              "machine": {"cores": os.cpu_count()}}
    try:
        warm_all(stack)
        baseline_rows = drain(stack, fake, set(), 30.0)
        baseline = {r["event_id"] for r in baseline_rows}
        fake.reset()
        say(f"chaos: stack up with {plan.replicas}; load for {plan.duration_s:.0f}s at {plan.rps} req/s")
        keys = [MASTER_KEY]
        if plan.virtual_key_rpm:
            created = stack.cli("keys", "create", "--name", "chaos", "--rpm", str(plan.virtual_key_rpm), "--json")
            if created.returncode != 0:
                raise RuntimeError(f"could not create a virtual key: {created.stderr}")
            keys.append(orjson.loads(created.stdout)["key"])
        traffic = Traffic(ingress_urls(stack), plan, keys)
        batch = Batch(stack, plan.batch_lines, workdir) if plan.batch_lines else None
        outages: list[dict[str, Any]] = []
        kills: list[dict[str, Any]] = []
        side: list[threading.Thread] = []
        events: list[tuple[float, str, Any]] = [(t, "kill", name) for t, name in plan.kills]
        if plan.broker_kill_at_s is not None and stack.info.get("broker_kind") == "kafka":
            events.append((plan.broker_kill_at_s, "kill", "broker"))
        events += [(t, "pg", length) for t, length in plan.pg_outages]
        if batch is not None:
            events.append((plan.batch_at_s, "batch", None))
        events.sort(key=lambda e: e[0])
        started = time.monotonic()
        traffic.start()
        last_kill = 0.0
        for at, what, arg in events:
            when = started + at
            if what == "kill":  # a schedule held up (waiting for a slow burst) stays spaced, never bunched
                when = max(when, last_kill + plan.min_kill_gap_s)
            if what == "kill" and when > started + plan.duration_s - 5:
                continue  # the schedule slipped past the load: leave time for the last kill's effects
            time.sleep(max(0.0, when - time.monotonic()))
            if what == "kill":
                if arg.startswith("worker") and plan.slow_burst:
                    before = slow_calls(fake, plan)
                    traffic.burst(plan.slow_burst, SLOW_MODEL)
                    deadline = time.monotonic() + 20
                    while slow_calls(fake, plan) < before + plan.slow_burst and time.monotonic() < deadline:
                        time.sleep(0.05)
                    time.sleep(0.3)
                result = kill_child(stack, arg)
                last_kill = time.monotonic()
                result["at_s"] = round(time.monotonic() - started, 1)
                kills.append(result)
                say(f"chaos: t={result['at_s']}s SIGKILL {arg} (pid {result['old_pid']}), restarted as "
                    f"{result['new_pid']} after {result['restart_s']}s")
            elif what == "pg":
                say(f"chaos: t={time.monotonic() - started:.1f}s PostgreSQL stopped for {arg:.0f}s")
                thread = threading.Thread(target=pg_outage, args=(stack, arg, outages, started), daemon=True)
                thread.start()
                side.append(thread)
            elif what == "batch" and batch is not None:
                batch.start()
        time.sleep(max(0.0, started + plan.duration_s - time.monotonic()))
        traffic.stop()
        for thread in side:
            thread.join()
        say(f"chaos: load stopped after {time.monotonic() - started:.0f}s; waiting for the batch and accounting")
        batch_done = batch.join(plan.drain_timeout_s + plan.request_timeout_s) if batch is not None else True
        answered = {o.request_id for o in traffic.outcomes if o.status == 200 and o.request_id}
        answered |= {r["response"]["request_id"] for r in (batch.results() if batch is not None else [])
                     if r["response"]["status_code"] == 200}
        rows = drain(stack, fake, baseline, plan.drain_timeout_s, answered)
        report.update(audit(traffic.outcomes, batch, rows, provider_calls(fake)))
        report["batch"]["finished"] = batch_done
        report["kills"] = kills
        report["restarts"] = read_stack(stack.cwd).get("restarts")
        report["broker_kind"] = stack.info.get("broker_kind")
        report["broker_restarts"] = (read_stack(stack.cwd).get("broker") or {}).get("restarts")
        report["pg_outages"] = outages
        report["load_s"] = round(time.monotonic() - started, 1)
        if plan.broker_restart:
            say("chaos: SIGKILL the embedded broker")
            report["broker_restart"] = broker_restart(stack, fake, baseline | {r["event_id"] for r in rows},
                                                      workdir)
    finally:
        code = stack.stop()
        fake.stop()
        report["stack_exit_code"] = code
        report["supervisor_log_tail"] = stack.log()[-4000:]
        report["total_s"] = round(time.monotonic() - began_all, 1)
    return report


def summary(report: dict[str, Any]) -> str:
    keys = ("sent", "answered", "lost", "duplicate_usage_rows", "usage_rows", "provider_calls", "in_doubt_rows",
            "redelivered_rows", "answered_without_usage_count")
    return ", ".join(f"{k}={report.get(k)}" for k in keys)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    parser.add_argument("--rps", type=float, default=12.0, help="HTTP requests started per second (default 12)")
    parser.add_argument("--kill-every", type=float, default=7.0, help="mean seconds between SIGKILLs (default 7)")
    parser.add_argument("--pg-outages", type=int, default=3, help="PostgreSQL stops of 30 s each (default 3)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-broker-restart", action="store_true")
    parser.add_argument("--short", action="store_true", help="the CI plan of tests/test_chaos.py (about 100 s)")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".work" / "chaos")
    parser.add_argument("--out", type=Path, default=None, help="result file (default bench/results/chaos-<date>.json)")
    args = parser.parse_args()
    plan = Plan() if args.short else long_plan(args.duration, args.rps, args.kill_every, args.pg_outages, args.seed)
    plan.broker_restart = not args.no_broker_restart
    workdir = args.workdir / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    report = run_chaos(plan, workdir)
    out = args.out or RESULTS / f"chaos-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2, default=str))
    print(f"chaos: {summary(report)}")
    print(f"chaos: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
