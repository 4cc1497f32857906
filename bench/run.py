"""One command for the side-by-side benchmark: fake provider, Switchyard, LiteLLM proxy, same scenarios.

    .venv/bin/python bench/run.py            # full: ~10 min, 2 repeats, writes results JSON + README table
    .venv/bin/python bench/run.py --quick    # shorter scenarios (~5 min)
    .venv/bin/python bench/run.py --smoke    # ~10 s of tiny load, fake + Switchyard only (CI)

Targets (`--targets`, comma list): `switchyard` (the stack on the embedded Apache Kafka), `tansu` (the
same stack on the embedded Tansu, reported as `switchyard-tansu`) and `litellm`; all three by default.

Order: the fake provider starts once and is measured directly (the baseline every overhead is
taken against, and the proof that the client and fake are far faster than the targets); then
each target runs alone, warms up, and goes through every scenario `repeats` times. CPU is read
from /proc for the target's whole process tree around each scenario. Nothing here asserts: a
benchmark is a measurement, not a test (the smoke mode exits non-zero only if the harness
itself could not run or no request succeeded).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402 - bench/ is not a package; run as a script
import procstat  # noqa: E402
from fake_openai import FakeOpenAI, expected_stream_text  # noqa: E402
from targets import BENCH, REPO, FakeProvider, LiteLLM, Switchyard  # noqa: E402

README = BENCH / "README.md"
RESULTS = BENCH / "results"
START_MARK = "<!-- bench:results:start -->"
END_MARK = "<!-- bench:results:end -->"


@dataclass(frozen=True)
class Plan:
    """How long each scenario runs, and how often; the three modes differ only here."""

    repeats: int
    closed_s: float
    open_s: float
    seq_s: float
    stream_s: float
    warm_s: float
    idle_s: float
    connections: int = 50
    rates: tuple[float, ...] = (50.0, 200.0)
    drain_s: float = 8.0


PLANS = {
    "full": Plan(repeats=2, closed_s=10, open_s=10, seq_s=5, stream_s=5, warm_s=3, idle_s=3),
    "quick": Plan(repeats=2, closed_s=4, open_s=4, seq_s=2.5, stream_s=2.5, warm_s=2, idle_s=2, drain_s=5),
    "smoke": Plan(repeats=1, closed_s=1.5, open_s=1.5, seq_s=1, stream_s=1, warm_s=0.5, idle_s=0, connections=10,
                  rates=(50.0,), drain_s=3),
}


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- measuring one scenario ------------------------------------------------------------------

async def measured(run: Callable[[], Awaitable[dict[str, Any]]], roots: list[int],
                   fake_roots: list[int], peaks: bool = False) -> dict[str, Any]:
    """Run a scenario and attach what it cost: the target's CPU per process label, the fake's, the client's.

    With `peaks`, also each process's peak RSS during the scenario alone (`memory`); the peaks before it are
    kept in `memory_before`, so the whole run's peak is still known (`summarize`)."""
    memory_before = procstat.memory(roots) if peaks else None
    if peaks:
        procstat.reset_peaks(roots)
    before, fake_before = procstat.snapshot(roots), procstat.snapshot(fake_roots)
    client_before, t0 = time.process_time(), time.perf_counter()
    result = await run()
    elapsed = time.perf_counter() - t0
    client_ms = (time.process_time() - client_before) * 1000.0
    by_label = procstat.cpu_delta(before, procstat.snapshot(roots))
    fake_ms = sum(procstat.cpu_delta(fake_before, procstat.snapshot(fake_roots)).values())
    ok = max(1, result["ok"])
    total = sum(by_label.values())
    result["cpu"] = {
        "total_ms": round(total, 1), "ms_per_req": round(total / ok, 3),
        "cores_busy": round(total / 1000.0 / elapsed, 2),
        "by_process_ms_per_req": {k: round(v / ok, 3) for k, v in sorted(by_label.items())},
        "fake_ms_per_req": round(fake_ms / ok, 3), "client_ms_per_req": round(client_ms / ok, 3),
    }
    if memory_before is not None:
        result["memory_before"], result["memory"] = memory_before, procstat.memory(roots)
    return result


async def settle(ep: loadgen.Endpoint, limit_s: float = 30.0, fast_ms: float = 250.0) -> float:
    """Wait until the target answers one request quickly again: an overloaded scenario leaves a backlog
    (Switchyard keeps working through requests already in Kafka after their client left) that must not
    leak into the next scenario. Returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        try:
            answer = await loadgen.one_request(ep, timeout_s=limit_s)
            if answer.status == 200 and (answer.done - answer.started) * 1000.0 < fast_ms:
                break
        except OSError:
            await asyncio.sleep(0.2)
    return round(time.perf_counter() - t0, 2)


async def prepare(name: str, ep: loadgen.Endpoint, roots: list[int], plan: Plan, text: str,
                  idle: bool) -> dict[str, Any]:
    """Warm up (group joins after a resume, connection pools), then optionally measure the idle cost."""
    out: dict[str, Any] = {}
    for stream in (False, True):
        await loadgen.wait_ready(ep, stream=stream, timeout_s=120)
    await loadgen.closed_loop(ep, plan.connections, plan.warm_s)
    await loadgen.sequential(ep, min(1.0, plan.warm_s), stream=True, expected_text=text)
    out["settle_s"] = await settle(ep)
    if idle and plan.idle_s > 0:
        await asyncio.sleep(0.5)
        before = procstat.snapshot(roots)
        await asyncio.sleep(plan.idle_s)
        cpu = procstat.cpu_delta(before, procstat.snapshot(roots))
        out["idle_cpu_ms_per_s"] = {"total": round(sum(cpu.values()) / plan.idle_s, 1),
                                    **{k: round(v / plan.idle_s, 1) for k, v in sorted(cpu.items())}}
    return out


async def one_repeat(name: str, ep: loadgen.Endpoint, roots: list[int], fake: FakeProvider, plan: Plan,
                     rep: int, text: str) -> dict[str, Any]:
    """Every scenario once. An open-loop rate above the max throughput just measured is skipped and
    reported as overloaded: its latency would only be the queue growing for as long as we let it."""
    r: dict[str, Any] = {"load_before": list(os.getloadavg())}
    _say(f"{name}: repeat {rep + 1}/{plan.repeats}: max throughput ({plan.connections} connections)")
    r["closed"] = await measured(lambda: loadgen.closed_loop(ep, plan.connections, plan.closed_s), roots,
                                 fake.roots, peaks=True)
    r["closed"]["settle_s"] = await settle(ep)
    for rate in plan.rates:
        key = f"open{rate:g}"
        if rate > r["closed"]["rps"]:
            _say(f"{name}: open loop {rate:g} req/s skipped: above its max throughput {r['closed']['rps']}")
            r[key] = {"skipped": f"overloaded: max throughput {r['closed']['rps']} req/s", "ok": 0}
            continue
        _say(f"{name}: repeat {rep + 1}: open loop {rate:g} req/s")
        r[key] = await measured(
            lambda rate=rate: loadgen.open_loop(ep, rate, plan.open_s, drain_s=plan.drain_s),  # type: ignore[misc]
            roots, fake.roots)
        r[key]["settle_s"] = await settle(ep)
    _say(f"{name}: repeat {rep + 1}: streaming throughput ({plan.connections} connections)")
    r["stream_closed"] = await measured(
        lambda: loadgen.closed_loop(ep, plan.connections, plan.closed_s, stream=True, expected_text=text),
        roots, fake.roots)
    r["stream_closed"]["settle_s"] = await settle(ep)
    _say(f"{name}: repeat {rep + 1}: single connection, then streaming")
    r["sequential"] = await measured(lambda: loadgen.sequential(ep, plan.seq_s), roots, fake.roots)
    r["stream"] = await measured(lambda: loadgen.sequential(ep, plan.stream_s, stream=True, expected_text=text),
                                 roots, fake.roots)
    r["load_after"] = list(os.getloadavg())
    return r


# ---- summaries -------------------------------------------------------------------------------

def _med(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v == v]  # drop NaN
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": round(statistics.median(vals), 3), "min": round(min(vals), 3), "max": round(max(vals), 3)}


def _pick(target: dict[str, Any], scenario: str, *path: str) -> list[float]:
    vals = []
    for rep in target["repeats"]:
        node: Any = rep.get(scenario)
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, int | float):
            vals.append(float(node))
    return vals


def summarize(target: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Medians across repeats, with min and max as the spread."""
    s: dict[str, Any] = {
        "max_rps": _med(_pick(target, "closed", "rps")),
        "max_errors": sum(sum(rep["closed"]["errors"].values()) for rep in target["repeats"]),
        "cpu_ms_per_req_at_max": _med(_pick(target, "closed", "cpu", "ms_per_req")),
        "seq_p50": _med(_pick(target, "sequential", "latency_ms", "p50")),
        "seq_p99": _med(_pick(target, "sequential", "latency_ms", "p99")),
        "ttft_p50": _med(_pick(target, "stream", "ttft_ms", "p50")),
        "ttft_p99": _med(_pick(target, "stream", "ttft_ms", "p99")),
        "stream_total_p50": _med(_pick(target, "stream", "latency_ms", "p50")),
        "bad_streams": sum(rep["stream"].get("bad_streams", 0) + rep.get("stream_closed", {}).get("bad_streams", 0)
                           for rep in target["repeats"]),
        "streams": sum(rep["stream"]["ok"] + rep.get("stream_closed", {}).get("ok", 0) for rep in target["repeats"]),
        "max_streams_per_s": _med(_pick(target, "stream_closed", "rps")),
        "stream_errors": sum(sum(rep.get("stream_closed", {}).get("errors", {}).values())
                             for rep in target["repeats"]),
        "cpu_ms_per_stream": _med(_pick(target, "stream_closed", "cpu", "ms_per_req")),
    }
    for rate in plan.rates:
        key = f"open{rate:g}"
        s[key] = {q: _med(_pick(target, key, "latency_ms", q)) for q in ("p50", "p90", "p99")}
        s[key]["achieved_rps"] = _med(_pick(target, key, "rps"))
        s[key]["errors"] = sum(sum(rep[key].get("errors", {}).values()) for rep in target["repeats"])
        s[key]["skipped"] = [rep[key]["skipped"] for rep in target["repeats"] if "skipped" in rep[key]]
        s[key]["cpu_ms_per_req"] = _med(_pick(target, key, "cpu", "ms_per_req"))
    labels = sorted({lab for rep in target["repeats"] for lab in rep["closed"]["cpu"]["by_process_ms_per_req"]})
    s["cpu_by_process_at_max"] = {lab: _med(_pick(target, "closed", "cpu", "by_process_ms_per_req", lab))["median"]
                                  for lab in labels}
    closed = [rep["closed"] for rep in target["repeats"]]
    s["peak_rss_mb_by_process"] = _peaks([target.get("memory", {}),
                                          *(c.get(k, {}) for c in closed for k in ("memory_before", "memory"))])
    s["peak_rss_mb_at_max_by_process"] = _peaks([c.get("memory", {}) for c in closed])
    if "spans_dropped" in target:
        s["spans_dropped_by_process"] = target["spans_dropped"]
    return s


def _peaks(snapshots: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """The highest peak RSS per process label over `procstat.memory` snapshots."""
    peaks: dict[str, float] = {}
    for snapshot in snapshots:
        for key, mem in snapshot.items():
            lab = key.split("[")[0]
            peaks[lab] = max(peaks.get(lab, 0.0), mem["peak_rss_mb"])
    return dict(sorted(peaks.items()))


def overheads(fake: dict[str, Any], target: dict[str, Any], plan: Plan) -> dict[str, float]:
    """Target minus fake direct, from medians of the same run."""
    out = {
        "single_conn_p50": target["seq_p50"]["median"] - fake["seq_p50"]["median"],
        "single_conn_p99": target["seq_p99"]["median"] - fake["seq_p99"]["median"],
        "ttft_p50": target["ttft_p50"]["median"] - fake["ttft_p50"]["median"],
        "ttft_p99": target["ttft_p99"]["median"] - fake["ttft_p99"]["median"],
    }
    for rate in plan.rates:
        key = f"open{rate:g}"
        for q in ("p50", "p99"):
            out[f"{key}_{q}"] = target[key][q]["median"] - fake[key][q]["median"]
    return {k: round(v, 3) for k, v in out.items()}


# ---- the README table ------------------------------------------------------------------------

def _fmt(m: dict[str, float], digits: int = 1) -> str:
    med, lo, hi = m["median"], m["min"], m["max"]
    if med != med:
        return "n/a"
    if lo == hi:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


_SERVICES = ("ingress", "router", "worker", "accounting")
"""The process labels (before any `-`) of Switchyard's services, in the order the tables give them."""


def table(doc: dict[str, Any]) -> str:
    """The markdown that goes between the README markers: headline table and Switchyard's breakdown."""
    plan = Plan(**doc["plan"])
    s = doc["summary"]
    variants = sorted(n for n in s if n.startswith("switchyard-"))
    names = [n for n in ("fake-direct", "switchyard", *variants, "litellm") if n in s]
    head = {"fake-direct": "fake direct", "switchyard": "Switchyard", "litellm": f"LiteLLM {doc.get('litellm', '')}",
            **{v: f"Switchyard `{v.removeprefix('switchyard-')}`" for v in variants}}
    ratio = "switchyard" in s and "litellm" in s
    lines = [
        f"Run **{doc['date']}** (`{doc['command']}`, mode `{doc['mode']}`, {plan.repeats} repeats; "
        f"median (min–max) across repeats).",
        f"Machine: {doc['machine']['cores']} cores ({doc['machine']['cpu_model']}), "
        f"{doc['machine']['mem_gb']} GB; load average {', '.join(f'{x:.2f}' for x in doc['machine']['loadavg'])} "
        "at start (shared machine: other work was running; compare columns, not runs).",
        "",
        "| metric | " + " | ".join(head[n] for n in names) + (" | Switchyard ÷ LiteLLM" if ratio else "")
        + " | target (issues 10, 12) |",
        "| --- | " + " | ".join("---" for _ in names) + (" | ---" if ratio else "") + " | --- |",
    ]

    def row(label: str, cells: list[str], r: str = "", target: str = "") -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {r}" if ratio else "") + f" | {target} |")

    def ratio_of(a: float, b: float) -> str:
        return f"{a / b:.2f}×" if b else "n/a"

    row(f"max throughput, req/s (closed loop, {plan.connections} conns)",
        [_fmt(s[n]["max_rps"], 0) for n in names],
        ratio_of(s["switchyard"]["max_rps"]["median"], s["litellm"]["max_rps"]["median"]) if ratio else "",
        "≥ 1,200, 0 errors")
    row("errors during max throughput", [str(s[n]["max_errors"]) for n in names], "", "0")
    row("CPU ms / request at max throughput (all processes)", [_fmt(s[n]["cpu_ms_per_req_at_max"], 2)
                                                                for n in names],
        ratio_of(s["switchyard"]["cpu_ms_per_req_at_max"]["median"],
                 s["litellm"]["cpu_ms_per_req_at_max"]["median"]) if ratio else "", "≤ 1.5")
    for rate in plan.rates:
        key = f"open{rate:g}"

        def cell(n: str, text: str, key: str = key) -> str:
            """`overloaded` where every repeat skipped this rate (above the target's max throughput)."""
            if s[n][key]["skipped"] and s[n][key]["achieved_rps"]["median"] != s[n][key]["achieved_rps"]["median"]:
                return "overloaded"
            return text

        row(f"CPU ms / request at {rate:g} req/s", [cell(n, _fmt(s[n][key]["cpu_ms_per_req"], 2)) for n in names])
        row(f"latency at {rate:g} req/s, ms p50 / p90 / p99",
            [cell(n, " / ".join(f"{s[n][key][q]['median']:.1f}" for q in ("p50", "p90", "p99"))) for n in names])
        row(f"achieved req/s at {rate:g} offered (errors)",
            [cell(n, f"{s[n][key]['achieved_rps']['median']:.0f} ({s[n][key]['errors']})") for n in names])
        tgt = "p50 ≤ 6, p99 ≤ 20" if rate == 50 else ""
        row(f"added latency at {rate:g} req/s, ms p50 / p99 (target − fake)",
            ["—" if n == "fake-direct" else
             cell(n, f"{doc['overhead'][n][key + '_p50']:.1f} / {doc['overhead'][n][key + '_p99']:.1f}")
             for n in names], "", tgt)
    row("single connection, ms p50 / p99", [f"{_fmt(s[n]['seq_p50'], 2)} / {_fmt(s[n]['seq_p99'], 2)}"
                                            for n in names])
    row("single-connection overhead, ms p50 / p99 (target − fake)",
        ["—" if n == "fake-direct" else
         f"{doc['overhead'][n]['single_conn_p50']:.2f} / {doc['overhead'][n]['single_conn_p99']:.2f}" for n in names],
        "", "p50 ≤ 5, p99 ≤ 15")
    if all("max_streams_per_s" in s[n] for n in names):
        row(f"max streams/s ({plan.connections} conns, {doc.get('stream_chunks', 16)}-chunk streams, text checked; "
            "errors)", [f"{_fmt(s[n]['max_streams_per_s'], 0)} ({s[n]['stream_errors']})" for n in names],
            ratio_of(s["switchyard"]["max_streams_per_s"]["median"], s["litellm"]["max_streams_per_s"]["median"])
            if ratio else "", "≥ 600")
        row("CPU ms / stream at max streams/s (all processes)", [_fmt(s[n]["cpu_ms_per_stream"], 2) for n in names])
    row("streaming time to first token, ms p50 / p99", [f"{_fmt(s[n]['ttft_p50'], 2)} / {_fmt(s[n]['ttft_p99'], 2)}"
                                                        for n in names])
    row("streaming TTFT overhead, ms p50 (target − fake)",
        ["—" if n == "fake-direct" else f"{doc['overhead'][n]['ttft_p50']:.2f}" for n in names], "", "≤ 8")
    row("streaming total, ms p50", [_fmt(s[n]["stream_total_p50"], 1) for n in names])
    row("streams with wrong text (order / framing)", [f"{s[n]['bad_streams']} of {s[n]['streams']}" for n in names],
        "", "0")
    def services_at_max(n: str) -> str:
        by = {lab.split("-")[0]: v for lab, v in s[n].get("peak_rss_mb_at_max_by_process", {}).items()}
        if not any(lab in by for lab in _SERVICES):  # one process (LiteLLM, the fake)
            return f"{max(by.values(), default=0):.0f}"
        return " / ".join(f"{by.get(lab, 0):.0f}" for lab in (*_SERVICES, "supervisor"))
    row("peak RSS at max throughput, MB: ingress / router / worker / accounting / supervisor (one process: it)",
        [services_at_max(n) for n in names], "", "≤ 80 each; supervisor ≤ 60")
    row("peak RSS, MB: largest process / sum",
        [f"{max(s[n]['peak_rss_mb_by_process'].values(), default=0):.0f} / "
         f"{sum(s[n]['peak_rss_mb_by_process'].values()):.0f}" for n in names], "", "≤ 80 per service")
    def idle(n: str, labels: tuple[str, ...] | None) -> str:
        """Idle CPU in ms per second: the whole tree (None), or only the named processes."""
        cpu = doc["targets"][n].get("idle_cpu_ms_per_s", {})
        if labels is None:
            return f"{cpu.get('total', 0):.0f}"
        return f"{sum(v for k, v in cpu.items() if k in labels):.0f}"

    row("idle CPU, ms per second: whole tree", [idle(n, None) for n in names])
    python_services = tuple(sorted({k for n in names for k in doc["targets"][n].get("idle_cpu_ms_per_s", {})
                                    if k not in ("total", "broker", "postgres", "fake-direct", "litellm")}))
    if any(n.startswith("switchyard") for n in names):
        row("idle CPU, ms per second: Python services (supervisor included)",
            ["—" if not n.startswith("switchyard") else idle(n, python_services) for n in names], "", "≤ 30")
        row("idle CPU, ms per second: broker (JVM for Kafka)",
            ["—" if not n.startswith("switchyard") else idle(n, ("broker",)) for n in names])
    fake_client = doc["summary"]["fake-direct"].get("client_ms_per_req_at_max")
    if fake_client is not None:
        lines += ["", f"The client itself spends {fake_client:.3f} ms CPU per request (measured on the fake-direct "
                  "row), so it is never what limits a target."]
    if "switchyard" in s:
        sy = s["switchyard"]
        lines += ["", "Switchyard, per process: CPU ms per request at max throughput; peak RSS (MB) during the max "
                  "throughput scenario (the highest of its repeats), and over the whole run (the "
                  "open-loop scenarios can hold hundreds of requests in flight):", "",
                  "| process | CPU ms / req | peak RSS MB at max throughput | peak RSS MB, whole run |",
                  "| --- | --- | --- | --- |"]
        at_max = sy.get("peak_rss_mb_at_max_by_process", {})
        def cell(value: float | None, digits: int) -> str:
            return "" if value is None else f"{value:.{digits}f}"
        for lab in sorted(set(sy["cpu_by_process_at_max"]) | set(sy["peak_rss_mb_by_process"])):
            lines.append(f"| {lab} | {cell(sy['cpu_by_process_at_max'].get(lab), 3)} | {cell(at_max.get(lab), 0)} | "
                         f"{cell(sy['peak_rss_mb_by_process'].get(lab), 0)} |")
    dirty = f", uncommitted changes in {', '.join(doc['git_dirty'])}" if doc.get("git_dirty") else ""
    lines += ["", f"Raw results: `{doc['file']}` (git {doc['git']}{dirty})."]
    return "\n".join(lines)


def update_readme(markdown: str) -> None:
    """Replace only what lies between the markers, so other sections of the README stay as others wrote them."""
    text = README.read_text() if README.exists() else ""
    if START_MARK in text and END_MARK in text:
        before = text.split(START_MARK, 1)[0]
        after = text.split(END_MARK, 1)[1]
        README.write_text(f"{before}{START_MARK}\n{markdown}\n{END_MARK}{after}")
    else:
        README.write_text(f"{text}\n## Results\n\n{START_MARK}\n{markdown}\n{END_MARK}\n")


# ---- main ------------------------------------------------------------------------------------

def _start_all(targets: dict[str, Switchyard | LiteLLM]) -> None:
    """Start the targets side by side (LiteLLM's import alone takes a while on a busy machine)."""
    from concurrent.futures import ThreadPoolExecutor

    def start(name: str) -> None:
        t0 = time.time()
        _say(f"starting {name}")
        targets[name].start()
        _say(f"{name} up in {time.time() - t0:.1f}s on :{targets[name].port}")

    with ThreadPoolExecutor(len(targets) or 1) as pool:
        for future in [pool.submit(start, name) for name in targets]:
            future.result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter scenarios (~3-4 min)")
    mode.add_argument("--smoke", action="store_true", help="~10 s of tiny load: harness check for CI")
    parser.add_argument("--targets", default=None,
                        help="comma list of switchyard,tansu,litellm (default: all three; smoke: switchyard)")
    parser.add_argument("--repeats", type=int, default=None, help="override the mode's repeat count")
    parser.add_argument("--name", default=None, help="results file name part (default: the mode)")
    parser.add_argument("--nice", type=int, default=0,
                        help="run everything at this niceness (e.g. -5 on a machine others share; needs root)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="first wait up to this long for the 1-minute load average to drop below the core count")
    parser.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                        help="only rewrite the README table from an earlier results file")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    parser.add_argument("--repo", type=Path, default=None,
                        help="run Switchyard from this source tree (a patched copy) instead of the checkout")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PATH[:LIBDIR]",
                        help="also measure Switchyard from source tree PATH (PYTHONPATH; extra `:`-separated entries "
                             "allowed) as `switchyard-NAME`, interleaved with the others in the same run (A/B of a "
                             "proposed change under the same machine load)")
    parser.add_argument("--rates", default=None, metavar="R1,R2",
                        help="open-loop rates in req/s instead of the mode's (50,200): e.g. 50,200,600 to compare "
                             "CPU per request at a fixed load near the max")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="extra environment for the Switchyard stack (e.g. to try a tuning knob)")
    parser.add_argument("--variant-env", action="append", default=[], metavar="K=V",
                        help="extra environment for the `--variant` stacks only (A/B of a setting on one tree)")
    args = parser.parse_args(argv)
    if args.render:
        earlier: dict[str, Any] = json.loads(args.render.read_text())
        if "/" not in earlier.get("file", "/"):
            earlier["file"] = f"bench/results/{earlier['file']}"
        update_readme(table(earlier))
        _say(f"README table rendered from {args.render}")
        return 0
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = PLANS[mode_name]
    if args.repeats:
        plan = replace(plan, repeats=args.repeats)
    if args.rates:
        plan = replace(plan, rates=tuple(float(rate) for rate in args.rates.split(",")))
    wanted = (args.targets or ("switchyard" if args.smoke else "switchyard,tansu,litellm")).split(",")
    if "litellm" in wanted and not LiteLLM.available():
        _say("LiteLLM venv missing (bench/.venv-litellm): "
             "python3 -m venv bench/.venv-litellm && bench/.venv-litellm/bin/pip install 'litellm[proxy]'; skipping")
        wanted.remove("litellm")
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    variant_env = dict(kv.split("=", 1) for kv in args.variant_env)

    if args.wait_quiet > 0:
        waited = _wait_quiet(args.wait_quiet)
        _say(f"waited {waited:.0f}s for a quieter machine; load average now {os.getloadavg()}")
    started = time.time()
    date = dt.datetime.now().strftime("%Y-%m-%d")
    doc: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "mode": mode_name, "plan": asdict(plan),
        "command": " ".join([".venv/bin/python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": procstat.machine(), "python": sys.version.split()[0], "targets": {}, "summary": {},
        "overhead": {}, "git": _git_head(), "git_dirty": _git_dirty(), "switchyard_env": extra_env,
        "variant_env": variant_env,
        "switchyard_repo": str(args.repo) if args.repo else "", "stream_chunks": FakeOpenAI.stream_chunks,
    }
    if "litellm" in wanted:
        doc["litellm"] = LiteLLM.version()
    if args.nice:
        os.nice(args.nice)  # inherited by the fake and the targets alike
        doc["nice"] = args.nice
    fake = FakeProvider()
    fake.start()
    _say(f"fake provider on :{fake.port}; machine {doc['machine']}")
    targets: dict[str, Switchyard | LiteLLM] = {}
    for name in wanted:
        if name == "litellm":
            targets[name] = LiteLLM(fake.api_base)
        elif name == "tansu":
            targets["switchyard-tansu"] = Switchyard(fake.api_base, extra_env, args.repo, broker="tansu",
                                                     name="switchyard-tansu")
        else:
            targets[name] = Switchyard(fake.api_base, extra_env, args.repo, broker="kafka")
    for spec in args.variant:
        vname, _, vpath = spec.partition("=")
        targets[f"switchyard-{vname}"] = Switchyard(fake.api_base, {**extra_env, **variant_env}, Path(vpath))
    doc["variants"] = {f"switchyard-{v.partition('=')[0]}": v.partition("=")[2] for v in args.variant}
    text = expected_stream_text(fake.stream_chunks)
    import uvloop

    finished = False
    try:
        _start_all(targets)
        for t in targets.values():
            procstat.pause(t.roots)
        data: dict[str, dict[str, Any]] = {n: {"name": n, "repeats": []} for n in ["fake-direct", *targets]}
        for rep in range(plan.repeats):
            # Interleaved: every repeat measures every target, in a rotating order, while the others are
            # stopped (SIGSTOP): a shared machine's load drifts, and an idle Switchyard still polls Kafka.
            order = list(targets)
            order = order[rep % len(order):] + order[:rep % len(order)] if order else order
            for name in ["fake-direct", *order]:
                cur = targets.get(name)
                roots = cur.roots if cur else fake.roots
                ep = cur.endpoint() if cur else fake.endpoint()
                if cur:
                    procstat.resume(cur.roots)
                try:
                    prep = uvloop.run(prepare(name, ep, roots, plan, text, idle=rep == 0))
                    data[name].update({k: v for k, v in prep.items() if k != "settle_s"})
                    result = uvloop.run(one_repeat(name, ep, roots, fake, plan, rep, text))
                    result["warm_settle_s"] = prep["settle_s"]
                    data[name]["repeats"].append(result)
                finally:
                    if cur:
                        procstat.pause(cur.roots)
        for name, t in targets.items():
            data[name]["memory"] = procstat.memory(t.roots)
        data["fake-direct"]["memory"] = procstat.memory(fake.roots)
        doc["targets"] = data
        finished = True
    finally:
        for name, t in targets.items():
            procstat.resume(t.roots)
            if isinstance(t, Switchyard) and finished:  # spans a stack could not export (tracing on only)
                doc["targets"][name]["spans_dropped"] = t.metric("switchyard_spans_dropped_total")
            if isinstance(t, Switchyard) and not finished:  # a failed run keeps the stacks' logs to read
                print(f"run failed: {t.name}'s logs are kept in {t.dir}", file=sys.stderr)
                t.stop(keep=True)
            else:
                t.stop()
        fake.stop()
    for name, data in doc["targets"].items():
        doc["summary"][name] = summarize(data, plan)
    fd = doc["summary"]["fake-direct"]
    fd["client_ms_per_req_at_max"] = _med(_pick(doc["targets"]["fake-direct"], "closed", "cpu",
                                                "client_ms_per_req"))["median"]
    for name in doc["targets"]:
        if name != "fake-direct":
            doc["overhead"][name] = overheads(fd, doc["summary"][name], plan)
    doc["wall_s"] = round(time.time() - started, 1)
    out_dir = BENCH / ".work" if args.smoke else RESULTS  # a CI smoke leaves the tree clean
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or mode_name
    path = out_dir / f"{date}-{name}.json"
    if path.exists():  # never overwrite an earlier run of the same day
        path = out_dir / f"{date}-{name}-{dt.datetime.now().strftime('%H%M')}.json"
    doc["file"] = str(path.relative_to(REPO))
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md = table(doc)
    print(md)
    _say(f"results: {path.relative_to(REPO)} ({doc['wall_s']}s)")
    if not args.no_readme and not args.smoke:
        update_readme(md)
        _say("README table updated")
    ok = all(summary["max_rps"]["median"] > 0 for summary in doc["summary"].values())
    return 0 if ok else 1


def _wait_quiet(limit_s: float) -> float:
    """Wait (bounded) for a lull on a shared machine: a run under a load of 10 on 2 cores measures the neighbours."""
    t0 = time.time()
    cores = os.cpu_count() or 1
    while time.time() - t0 < limit_s and os.getloadavg()[0] >= cores:
        time.sleep(5)
    return time.time() - t0


def _git_dirty() -> list[str]:
    """Uncommitted changes to the services' code at run time (others may be editing the same tree)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "services", "shared"], cwd=REPO,
                             capture_output=True, text=True, timeout=10).stdout
        return [line[3:] for line in out.splitlines()]
    except (OSError, subprocess.SubprocessError):
        return []


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


if __name__ == "__main__":
    sys.exit(main())
