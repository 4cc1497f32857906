"""Abuse figures (issue 18): random tokens, slow stream readers, fuzzing totals; the stack healthy after each.

    .venv/bin/python bench/abuse.py            # full size (30-40 min, 2 loaded cores): bench/results/abuse-<date>.json
                                               # and the "Abuse figures" table in bench/README.md
    .venv/bin/python bench/abuse.py --smoke    # small numbers, a few minutes; writes bench/.work/abuse-smoke.json

1. **Bad tokens** (bench/abuse_tokens.py): `--tokens` requests (10,000) with random `sk-sy-...` bearer tokens,
   `--concurrency` (50) at a time, once the keys are loaded: from one address (throttled: 401 vs 429 counted)
   and from as many addresses as requests (so every token reaches the key store). PostgreSQL work is read from
   PostgreSQL (pg_stat_statements, preloaded into the embedded cluster before `switchyard up` starts it), against
   an idle control interval of the same length. Expected: 0 key lookups, 0 attributable statements.
2. **Slow readers** (bench/abuse_streams.py): `--slow-clients` (1,000) streams read a few bytes a second or not
   at all, held `--hold` seconds, against a provider streaming `--stream-chunks` chunks per answer; peak RSS of
   every process against the caps below; ordinary requests during and after; what ended each stream.
3. **Fuzzing totals** (bench/abuse_fuzz.py): the two fuzz test files with `--api-fuzz-examples` /
   `--adapter-fuzz-examples` cases (the suite's defaults are 25 and 100).

The stack is `switchyard up` in a scratch folder (bench/targets.py: embedded Apache Kafka and PostgreSQL, every
service, one model `bench` on bench/fake_openai.py), with the gateway's defaults: nothing is tuned for the bench.
Nothing here asserts; the figures are reported against the expectations in the JSON's `verdicts`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent))  # the repository, when run as a script

import abuse_fuzz  # noqa: E402
import abuse_streams  # noqa: E402
import abuse_tokens  # noqa: E402
import httpx  # noqa: E402
from procstat import machine  # noqa: E402
from targets import MODEL, SWITCHYARD_KEY, FakeProvider, Switchyard, free_port  # noqa: E402

from switchyard.devstack.postgres import EmbeddedPostgres  # noqa: E402
from switchyard.shared.settings import read_stack  # noqa: E402

RSS_CAP_MB = {"ingress": 200.0, "router": 200.0, "worker-openai": 200.0, "accounting": 200.0, "supervisor": 200.0}
"""Peak resident memory each service may reach under 1,000 slow stream readers (see bench/README.md)."""
SERVICES = tuple(RSS_CAP_MB)


def with_statement_stats(stack: Switchyard) -> None:
    """Create the stack's embedded PostgreSQL cluster ahead of `switchyard up` (which then reuses it), with
    pg_stat_statements preloaded: the bench can then count the gateway's statements one by one."""
    pg = EmbeddedPostgres(stack.dir / ".switchyard" / "pg", free_port())
    pg.start()
    pg.stop()
    with (pg.data / "postgresql.conf").open("a") as conf:
        conf.write("\n# bench/abuse.py: count every statement\nshared_preload_libraries = 'pg_stat_statements'\n"
                   "pg_stat_statements.track = all\npg_stat_statements.max = 10000\n")


async def healthy(url: str) -> dict[str, Any]:
    """/health and /ready of ingress, and one ordinary request answered."""
    async with httpx.AsyncClient(timeout=60) as client:
        health = await client.get(f"{url}/health")
        ready = await client.get(f"{url}/ready")
        answer = await client.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {SWITCHYARD_KEY}"},
                                   json={"model": MODEL, "messages": [{"role": "user", "content": "ok?"}]})
    return {"health": health.status_code, "ready": ready.status_code, "request": answer.status_code,
            "ok": health.status_code == ready.status_code == answer.status_code == 200}


def save_partial(out: dict[str, Any]) -> None:
    """What the run has measured so far (bench/.work/abuse-partial.json): a run stopped later keeps it."""
    (BENCH / ".work").mkdir(parents=True, exist_ok=True)
    (BENCH / ".work" / "abuse-partial.json").write_text(json.dumps(out, indent=2, default=str) + "\n")


def restarts(stack: Switchyard) -> dict[str, int]:
    return dict(read_stack(stack.dir).get("restarts") or {})


def run_stack_phases(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    fake = FakeProvider(stream_chunks=args.stream_chunks, chunk_gap_ms=args.chunk_gap_ms)
    fake.start()
    stack = Switchyard(fake.api_base, extra_env=dict(kv.split("=", 1) for kv in args.env), name="switchyard-abuse")
    out: dict[str, Any] = {}
    try:
        with_statement_stats(stack)
        say("starting switchyard up (embedded Apache Kafka and PostgreSQL, every service)")
        stack.start()
        url = f"http://127.0.0.1:{stack.port}"
        db = str(read_stack(stack.dir)["database_url"])
        out["restarts_before"] = restarts(stack)
        if args.tokens:
            out["bad_tokens"] = asyncio.run(abuse_tokens.run(url, db, SWITCHYARD_KEY, args.tokens,
                                                             args.concurrency, args.spread_concurrency, say))
            out["bad_tokens"]["healthy_after"] = asyncio.run(healthy(url))
            save_partial(out)
        if args.slow_clients:
            out["slow_readers"] = asyncio.run(abuse_streams.run(
                "127.0.0.1", stack.port, SWITCHYARD_KEY, MODEL, stack.roots, args.slow_clients, args.hold,
                long_streams=args.long_streams, long_chunks=args.long_chunks, long_chunk_bytes=args.long_chunk_bytes,
                drain_s=args.drain, say=say))
            out["slow_readers"].update({"stream_chunks": args.stream_chunks, "chunk_gap_ms": args.chunk_gap_ms,
                                        "rss_cap_mb": RSS_CAP_MB})
            out["slow_readers"]["healthy_after"] = asyncio.run(healthy(url))
        out["restarts_after"] = restarts(stack)
    finally:
        stack.stop(keep=args.keep)
        fake.stop()
        if args.keep:
            out["stack_dir"] = str(stack.dir)
    return out


def verdicts(doc: dict[str, Any]) -> dict[str, Any]:
    """Each figure against what issue 18 expects of it."""
    v: dict[str, Any] = {}
    if bt := doc.get("bad_tokens"):
        for name in ("one_address", "spread"):
            f = bt[name]
            v[f"bad_tokens_{name}_pg_key_lookups_0"] = f["pg_key_lookups"] == 0
            v[f"bad_tokens_{name}_no_statement_only_during_flood"] = not f["pg_statements_only_during_flood"]
            v[f"bad_tokens_{name}_no_5xx"] = not any(s.startswith("5") or not s.isdigit() for s in f["status"])
        v["bad_tokens_stack_healthy_after"] = bt["healthy_after"]["ok"]
    if sr := doc.get("slow_readers"):
        v["slow_readers_rss_under_cap"] = {s: sr["rss_mb_peak"].get(s, 0.0) <= cap for s, cap in RSS_CAP_MB.items()}
        v["slow_readers_probes_during_all_200"] = all(p["status"] == 200 for p in sr["probes_during"])
        v["slow_readers_no_other_outcome"] = not sr["outcomes"].get("other")
        if sr["long_streams"]:
            v["slow_readers_long_stalled_streams_cut"] = sr["outcomes_by_mode"]["long"].get("cut") == sr["long_streams"]
        v["slow_readers_stack_healthy_after"] = sr["healthy_after"]["ok"]
    if "restarts_after" in doc:
        v["no_process_restarted"] = doc["restarts_after"] == doc["restarts_before"]
    fuzz = doc.get("fuzz") or {}
    if api := fuzz.get("api"):
        v["fuzz_api_no_5xx"] = api["answers_5xx"] == 0
        v["fuzz_api_no_process_restarted"] = api["processes_restarted"] == 0
        v["fuzz_api_tests_passed"] = api["pytest_exit"] == 0
    if adapters := fuzz.get("adapters"):
        v["fuzz_adapters_no_crashing_exception"] = adapters["crashing_exceptions"] == 0
    return v


def _cell(value: Any) -> str:
    return "—" if value is None else str(value)


def table(doc: dict[str, Any]) -> str:
    """The README table (bench/README.md, "Abuse figures")."""
    lines = [f"Run **{doc['date']}** (`{doc['command']}`), git {doc['git']}. Machine: {doc['machine']['cores']} cores, "
             f"load average {', '.join(f'{x:.2f}' for x in doc['machine']['loadavg'])} at start.", "",
             "| figure | measured | expected |", "| --- | --- | --- |"]

    def row(label: str, measured: Any, expected: str) -> None:
        lines.append(f"| {label} | {_cell(measured)} | {expected} |")

    if bt := doc.get("bad_tokens"):
        for name, label in (("one_address", "one address"), ("spread", "one address each (X-Forwarded-For)")):
            f = bt[name]
            status = ", ".join(f"{k}: {n}" for k, n in sorted(f["status"].items()))
            row(f"random tokens, {label}: {f['requests']:,} at concurrency {f['concurrency']}",
                f"{status} in {f['seconds']} s", "401 until the throttle, then 429; no 5xx")
            row("… PostgreSQL key lookups (pg_stat_statements)", f["pg_key_lookups"], "0")
            row("… statements that ran only during the flood", len(f["pg_statements_only_during_flood"]), "0")
            row("… statements in the gateway's database: flood / idle control of the same length",
                f"{f['pg_during']['statement_calls']} / {f['pg_control']['statement_calls']}",
                "about equal (periodic loops only)")
        row("a valid key after the floods (from another address)", bt["spread"]["valid_key_after"]["status"], "200")
        row("the flooding address served again after", f"{bt['flooding_address_served_again_after_s']} s",
            "≤ 60 s (its throttle minute)")
    if sr := doc.get("slow_readers"):
        modes = sr["outcomes_by_mode"]

        def outcome(mode: str) -> str:
            return ", ".join(f"{k}: {n}" for k, n in sorted(modes.get(mode, {}).items())) or "—"

        row(f"slow readers: {sr['clients']:,} streams of {sr['stream_chunks']:,} chunks, held {sr['hold_s']:.0f} s "
            f"(half never read, half read {sr['trickle_bytes_per_s']} B/s)",
            f"stalled: {outcome('stalled')}; trickle: {outcome('trickle')}",
            "completed or cut (`stream_buffer_full`); 503 + Retry-After past the in-flight cap")
        if sr["long_streams"]:
            row(f"… plus {sr['long_streams']} stalled readers of {sr['long_chunks']:,}-chunk streams "
                f"(+{sr['long_chunk_bytes']} B a chunk: more than the kernel's socket buffers hold)",
                outcome("long"), "all cut (`stream_buffer_full`)")
        for service, cap in RSS_CAP_MB.items():
            peak = sr["rss_mb_peak"].get(service)
            before = sr["rss_mb_before"].get(service)
            row(f"… peak RSS, {service} (MB; before: {_cell(before)})", peak, f"≤ {cap:.0f}")
        for other in ("broker", "postgres"):
            row(f"… peak RSS, {other} (MB; not capped)", sr["rss_mb_peak"].get(other), "—")
        during = [p["status"] for p in sr["probes_during"]]
        row("… ordinary requests during (status)", f"{sum(s == 200 for s in during)} of {len(during)} 200", "all 200")
        row("… stack healthy after", sr["healthy_after"]["ok"], "True")
    fuzz = doc.get("fuzz") or {}
    if api := fuzz.get("api"):
        row(f"API fuzz (schemathesis, {api['examples_setting']} per route): calls over {api['routes']} routes",
            f"{api['calls']:,}", "")
        row("… 5xx answers", api["answers_5xx"], "0")
        row("… processes restarted", api["processes_restarted"], "0")
    if ad := fuzz.get("adapters"):
        row(f"adapter fuzz (hypothesis, {ad['examples_setting']} per test and adapter class): examples",
            f"{ad['examples']:,} over {len(ad['examples_per_target'])} targets", "")
        row("… exceptions other than GatewayError (would crash a worker)", ad["crashing_exceptions"], "0")
    if "restarts_after" in doc:
        row("supervised processes restarted during the stack phases",
            sum(doc["restarts_after"].values()) - sum(doc["restarts_before"].values()), "0")
    return "\n".join(lines)


def update_readme(markdown: str) -> None:
    readme = BENCH / "README.md"
    text = readme.read_text()
    start, end = "<!-- abuse:results:start -->", "<!-- abuse:results:end -->"
    block = f"{start}\n{markdown}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += f"\n## Abuse figures\n\n{block}\n"
    readme.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=10_000, help="random tokens per flood (0: skip)")
    parser.add_argument("--concurrency", type=int, default=50, help="requests in flight, one-address flood")
    parser.add_argument("--spread-concurrency", type=int, default=1000,
                        help="requests in flight, spread flood (each refusal waits up to 2.5 s for llm.keys)")
    parser.add_argument("--slow-clients", type=int, default=1_000, help="slow stream readers (0: skip)")
    parser.add_argument("--hold", type=float, default=120.0, help="seconds the slow readers are held")
    parser.add_argument("--drain", type=float, default=180.0, help="seconds each reader may then take to finish")
    parser.add_argument("--stream-chunks", type=int, default=1_000, help="content chunks per streamed answer")
    parser.add_argument("--chunk-gap-ms", type=float, default=2.0)
    parser.add_argument("--long-streams", type=int, default=10,
                        help="extra stalled readers of streams long enough to pass the kernel's socket buffers")
    parser.add_argument("--long-chunks", type=int, default=8_000)
    parser.add_argument("--long-chunk-bytes", type=int, default=1024)
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for the stack")
    parser.add_argument("--api-fuzz-examples", type=int, default=50, help="cases per route (0: skip)")
    parser.add_argument("--adapter-fuzz-examples", type=int, default=400, help="examples per test (0: skip)")
    parser.add_argument("--smoke", action="store_true", help="small numbers; results under bench/.work only")
    parser.add_argument("--keep", action="store_true", help="keep the stack's folder (logs) after the run")
    parser.add_argument("--name", default=None, help="results file name (default abuse-<date>)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.slow_clients, args.hold = min(args.tokens, 300), min(args.slow_clients, 50), 20.0
        args.stream_chunks, args.drain = min(args.stream_chunks, 1_500), 60.0
        args.api_fuzz_examples, args.adapter_fuzz_examples = min(args.api_fuzz_examples, 3), min(
            args.adapter_fuzz_examples, 5)

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    import subprocess

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True,
                         text=True).stdout.strip()
    doc: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "git": git,
                           "command": " ".join(["bench/abuse.py", *(argv if argv is not None else sys.argv[1:])]),
                           "machine": machine()}
    began = time.monotonic()
    doc.update(run_stack_phases(args, say))
    if args.api_fuzz_examples or args.adapter_fuzz_examples:
        doc["fuzz"] = {}
        if args.api_fuzz_examples:
            say(f"fuzz: tests/test_api_fuzz.py with {args.api_fuzz_examples} cases per route")
            doc["fuzz"]["api"] = abuse_fuzz.api_fuzz(args.api_fuzz_examples, timeout_s=1800)
        if args.adapter_fuzz_examples:
            say(f"fuzz: tests/test_adapter_fuzz.py with {args.adapter_fuzz_examples} examples per test")
            doc["fuzz"]["adapters"] = abuse_fuzz.adapter_fuzz(args.adapter_fuzz_examples, timeout_s=1800)
    doc["total_s"] = round(time.monotonic() - began, 1)
    doc["verdicts"] = verdicts(doc)
    if args.smoke:
        path = BENCH / ".work" / "abuse-smoke.json"
    else:
        path = BENCH / "results" / f"{args.name or 'abuse-' + dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    markdown = table(doc) + f"\n\nRaw results: `{path.relative_to(BENCH.parent)}`."
    print("\n" + markdown)
    every_part = min(args.tokens, args.slow_clients, args.api_fuzz_examples, args.adapter_fuzz_examples) > 0
    if not args.smoke and every_part:  # a run of one part leaves the table of the last whole run alone
        update_readme(markdown)
    say(f"done in {doc['total_s']:.0f} s; verdicts: {json.dumps(doc['verdicts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
