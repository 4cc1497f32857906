"""Failover benchmark: the primary deployment answers 503 for the middle half of a run.

It starts its own stack (`switchyard up`: embedded Tansu broker and PostgreSQL, one router, one
worker pool) in front of fake OpenAI servers that answer after `--latency-ms`, and runs the same
open-loop load twice:

- `with_failover`: model group [primary, secondary] (fallback strategy, the default circuit breaker);
- `without_failover`: model group [primary] only.

Requests are sent at a fixed rate (`--rps`) for `--duration` seconds, whether or not earlier ones
have finished (open loop, so a stall shows up as latency instead of hiding as fewer requests).
Request i of N is sent at i / rps; the primary answers 503 for requests sent in [N/4, 3N/4), i.e.
the middle 50 % of the run. Each request has a deadline of `--timeout-s` (header
`x-switchyard-timeout`). Latency is measured by the caller, from sending to the full answer.

Run (about 2 minutes with the defaults):

    .venv/bin/python bench/failover.py                          # writes bench/results/failover-<date>.json
    .venv/bin/python bench/failover.py --rps 10 --duration 20   # shorter

The JSON holds, per run: success rate, p50/p90/p99/max latency (all requests, and those sent
during the outage), the statuses of the failures, and how many calls each fake provider got.
Nothing here asserts: a benchmark is a measurement (tests/test_routing_e2e.py asserts behaviour).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi import Request

from switchyard.shared import topics
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Fault
from tests.stack import RunningStack, start_stack, warm_up

RESULTS = Path(__file__).resolve().parent / "results"


class SwitchableProvider(FakeOpenAI):
    """A fake OpenAI server that answers after a fixed latency, or with 503 while `down` is set."""

    def __init__(self, latency_ms: float) -> None:
        super().__init__()
        self.latency_ms = latency_ms
        self.down = False

    def take_fault(self, request: Request) -> Fault | None:
        return Fault(status=503 if self.down else None, latency_ms=self.latency_ms,
                     message="primary is down (benchmark outage)")


@dataclass
class Outcome:
    index: int
    status: int
    latency_ms: float
    deployment: str | None
    in_outage: bool


def _config(primary_a: FakeOpenAI, secondary: FakeOpenAI, primary_b: FakeOpenAI) -> str:
    def dep(fake: FakeOpenAI) -> str:
        return f"      - {{provider: openai, model: gpt-4o-mini, api_base: '{fake.url}/v1', api_key: sk-bench}}"

    return "\n".join([
        "models:",
        "  - name: with-failover",
        "    deployments:", dep(primary_a), dep(secondary),
        "  - name: without-failover",
        "    deployments:", dep(primary_b),
    ]) + "\n"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def _summary(outcomes: list[Outcome]) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200]
    latencies = [o.latency_ms for o in outcomes]
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "success_rate": round(len(ok) / len(outcomes), 4) if outcomes else None,
        "p50_ms": _percentile(latencies, 0.50),
        "p90_ms": _percentile(latencies, 0.90),
        "p99_ms": _percentile(latencies, 0.99),
        "max_ms": round(max(latencies), 1) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies), 1) if latencies else None,
        "failures_by_status": dict(Counter(str(o.status) for o in outcomes if o.status != 200)),
        "served_by": dict(Counter(o.deployment or "-" for o in ok)),
    }


async def _one(client: httpx.AsyncClient, stack: RunningStack, model: str, index: int, timeout_s: float,
               in_outage: bool) -> Outcome:
    body = {"model": model, "messages": [{"role": "user", "content": f"request {index}"}]}
    headers = {**stack.headers(), topics.HEADER_TIMEOUT: str(timeout_s)}
    started = time.perf_counter()
    try:
        r = await client.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers)
        status = r.status_code
        route = r.headers.get(topics.HEADER_ROUTE, "")
    except httpx.HTTPError:
        status, route = 599, ""  # the caller's own client gave up (should not happen: the gateway answers first)
    elapsed = (time.perf_counter() - started) * 1000.0
    deployment = None
    for part in route.split(";"):
        name, _, value = part.strip().partition("=")
        if name == "deployment":
            deployment = value
    return Outcome(index, status, elapsed, deployment, in_outage)


async def run_load(stack: RunningStack, model: str, primary: SwitchableProvider, rps: float, duration_s: float,
                   timeout_s: float) -> list[Outcome]:
    """Send N = rps * duration requests at a fixed rate; the primary is down for the middle half of them."""
    total = int(rps * duration_s)
    outage = range(total // 4, 3 * total // 4)
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=timeout_s + 30, limits=limits) as client:
        tasks = []
        begin = time.perf_counter()
        for i in range(total):
            delay = begin + i / rps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            primary.down = i in outage
            tasks.append(asyncio.create_task(_one(client, stack, model, i, timeout_s, i in outage)))
        primary.down = False
        return list(await asyncio.gather(*tasks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rps", type=float, default=20.0, help="requests per second (default 20)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per run (default 30)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="fake provider latency (default 50)")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="each request's deadline (default 30)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default bench/results/failover-<date>.json)")
    args = parser.parse_args(argv)

    primary_a, primary_b = SwitchableProvider(args.latency_ms).start(), SwitchableProvider(args.latency_ms).start()
    secondary = SwitchableProvider(args.latency_ms).start()
    work = Path(tempfile.mkdtemp(prefix="switchyard-failover-"))
    stack = start_stack(work, _config(primary_a, secondary, primary_b), timeout_s=180)
    runs: dict[str, Any] = {}
    try:
        for model in ("with-failover", "without-failover"):
            warm_up(stack, model)
        for name, model, primary in (("with_failover", "with-failover", primary_a),
                                     ("without_failover", "without-failover", primary_b)):
            for fake in (primary_a, primary_b, secondary):
                fake.reset()
            print(f"{name}: {int(args.rps * args.duration)} requests over {args.duration:.0f} s ...", flush=True)
            outcomes = asyncio.run(run_load(stack, model, primary, args.rps, args.duration, args.timeout_s))
            runs[name] = {
                "all": _summary(outcomes),
                "sent_during_outage": _summary([o for o in outcomes if o.in_outage]),
                "provider_calls": {"primary": len(primary.calls()),
                                   "secondary": len(secondary.calls()) if primary is primary_a else 0},
            }
            print(json.dumps(runs[name]["all"]), flush=True)
    finally:
        stack.stop()
        for fake in (primary_a, primary_b, secondary):
            fake.stop()

    result = {
        "benchmark": "failover",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "params": {"rps": args.rps, "duration_s": args.duration, "requests": int(args.rps * args.duration),
                   "outage": "primary answers 503 for requests [N/4, 3N/4)", "provider_latency_ms": args.latency_ms,
                   "deadline_s": args.timeout_s,
                   "breaker": "defaults: 3 failures in a row or >50 % of >=10 in 30 s; 10 s cooldown"},
        "runs": runs,
    }
    out = args.out or RESULTS / f"failover-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    header = f"| run | success | p50 ms | p99 ms | success (outage) | p50 (outage) | p99 (outage) |\n|{'---|' * 7}"
    print(header)
    for name, run in runs.items():
        a, o = run["all"], run["sent_during_outage"]
        print(f"| {name} | {a['success_rate']:.1%} | {a['p50_ms']} | {a['p99_ms']} | {o['success_rate']:.1%} "
              f"| {o['p50_ms']} | {o['p99_ms']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
