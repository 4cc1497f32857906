"""Profile every Switchyard service under load with py-spy, and summarise where the CPU goes.

    .venv/bin/python bench/profile.py                 # own fake + stack, 50-connection closed loop, 15 s
    .venv/bin/python bench/profile.py --rate 200      # open loop at 200 req/s instead
    .venv/bin/python bench/profile.py --stream        # streaming requests

py-spy samples each service process from outside (no code change, `--nonblocking` so it does
not pause them) at 100 Hz and writes collapsed stacks, aggregated by function. This script
then reports, per service, how busy it was and the functions with the most self and
inclusive time, to `bench/results/<date>-profile[-name].md` (and the raw stacks and
flamegraph-ready files under bench/.work/profiles/). py-spy is looked up on PATH, then in
bench/.work/tools (`python3 -m venv bench/.work/tools && bench/.work/tools/bin/pip install py-spy`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402 - bench/ is not a package; run as a script
import procstat  # noqa: E402
from targets import BENCH, WORK, FakeProvider, Switchyard  # noqa: E402


def py_spy() -> str:
    found = shutil.which("py-spy") or str(WORK / "tools" / "bin" / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy not found: python3 -m venv bench/.work/tools && bench/.work/tools/bin/pip install "
                         "py-spy")
    return found


def _frame_name(frame: str) -> str:
    """`handle (services/workers/main.py:120)` -> `handle (services/workers/main.py)`, paths shortened."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def analyse(collapsed: Path, seconds: float, rate: int, top: int) -> dict[str, object]:
    """Self and inclusive sample counts per function from py-spy's collapsed (`raw`) output."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
        leaf_path = frames[-1].partition(" (")[2].rstrip(")")
        modules[leaf_path.split("/")[0] if "/" in leaf_path else leaf_path] += count
    busy = total / max(1.0, seconds * rate)
    return {
        "samples": total, "busy_fraction": round(busy, 3),
        "self": [(f, round(100.0 * c / max(1, total), 1)) for f, c in self_c.most_common(top)],
        "inclusive": [(f, round(100.0 * c / max(1, total), 1)) for f, c in incl.most_common(top * 2)],
        "self_by_package": [(m, round(100.0 * c / max(1, total), 1)) for m, c in modules.most_common(12)],
    }


async def drive(ep: loadgen.Endpoint, seconds: float, rate: float | None, stream: bool) -> dict[str, object]:
    if rate:
        return await loadgen.open_loop(ep, rate, seconds, stream=stream, drain_s=5)
    return await loadgen.closed_loop(ep, 50, seconds, stream=stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=None, help="open loop at this rate (default: closed loop)")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--sample-rate", type=int, default=100)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--name", default="", help="suffix for the report file")
    parser.add_argument("--repo", type=Path, default=None,
                        help="run Switchyard from this source tree (a patched copy) instead of the checkout")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="extra env for the stack")
    args = parser.parse_args(argv)
    spy = py_spy()
    out_dir = WORK / "profiles" / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    fake = FakeProvider()
    fake.start()
    stack = Switchyard(fake.api_base, dict(kv.split("=", 1) for kv in args.env), args.repo)
    stack.start()
    import uvloop

    report: dict[str, object] = {}
    try:
        ep = stack.endpoint()
        uvloop.run(loadgen.warm_up(ep, stream=args.stream, seconds=3))
        pids = stack.service_pids()
        spies = {
            label: subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)),
                                     "--rate", str(args.sample_rate), "--nonblocking", "--function", "--format",
                                     "raw", "--output", str(out_dir / f"{label}.txt")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for label, pid in pids.items()
        }
        before = procstat.snapshot(stack.roots)
        load = uvloop.run(drive(ep, args.seconds, args.rate, args.stream))
        cpu = procstat.cpu_delta(before, procstat.snapshot(stack.roots))
        for p in spies.values():
            p.wait(timeout=60)
        ok = max(1, int(load["ok"]))  # type: ignore[call-overload]
        report = {"load": load, "cpu_ms_per_req": {k: round(v / ok, 3) for k, v in sorted(cpu.items())},
                  "services": {label: analyse(out_dir / f"{label}.txt", args.seconds, args.sample_rate, args.top)
                               for label in pids if (out_dir / f"{label}.txt").exists()}}
    finally:
        stack.stop()
        fake.stop()
    name = f"-{args.name}" if args.name else ""
    path = BENCH / "results" / f"{dt.date.today().isoformat()}-profile{name}.md"
    path.write_text(render(report, args, out_dir))
    print(path.read_text())
    return 0


def render(report: dict[str, object], args: argparse.Namespace, out_dir: Path) -> str:
    load = report["load"]
    assert isinstance(load, dict)
    mode = f"open loop {args.rate:g} req/s" if args.rate else "closed loop, 50 connections"
    lines = [f"# Switchyard profile, {dt.datetime.now().isoformat(timespec='seconds')}", "",
             f"Load: {mode}{', streaming' if args.stream else ''}, {args.seconds:g} s; "
             f"{load['ok']} ok at {load['rps']} req/s, errors {load['errors']}, latency {load['latency_ms']}.",
             f"Machine: {procstat.machine()}. Env: {args.env or 'default'}; source: {args.repo or 'checkout'}.",
             f"Raw stacks: {out_dir}.", "",
             "CPU ms per request by process (whole tree, /proc):", ""]
    cpu = report["cpu_ms_per_req"]
    assert isinstance(cpu, dict)
    lines += [f"- {k}: {v}" for k, v in cpu.items()] + [f"- total: {round(sum(cpu.values()), 3)}", ""]
    services = report["services"]
    assert isinstance(services, dict)
    for label, a in services.items():
        lines += [f"## {label}", "", f"busy {a['busy_fraction']:.0%} of one core (py-spy, {a['samples']} samples)",
                  "", "Self time by package: " + ", ".join(f"{m} {p}%" for m, p in a["self_by_package"]), "",
                  "| self % | function |", "| --- | --- |"]
        lines += [f"| {p} | `{f}` |" for f, p in a["self"]]
        lines += ["", "| inclusive % | function |", "| --- | --- |"]
        lines += [f"| {p} | `{f}` |" for f, p in a["inclusive"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
