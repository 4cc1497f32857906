"""One stack, closed loops at several connection counts: is throughput bound by CPU or by concurrency?

    .venv/bin/python bench/scale.py --connections 25,50,100,200 [--stream] [--repo PATH] [--seconds 10]

For each count it prints requests per second, mean and p99 latency, CPU per request of the stack's whole tree
(and each process's share of a core), and how much of the machine stayed idle (`/proc/stat`). If requests per
second stop rising with more connections while cores stay idle, something other than CPU bounds the loop; if
the idle share falls as throughput stops rising, CPU does. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402 - bench/ is not a package; run as a script
import procstat  # noqa: E402
from targets import FakeProvider, Switchyard  # noqa: E402


def machine_ticks() -> tuple[int, int]:
    """(idle + iowait, all) clock ticks of every core since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return values[3] + values[4], sum(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", default="25,50,100,200", help="comma list of connection counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each closed loop")
    parser.add_argument("--stream", action="store_true", help="streaming requests")
    parser.add_argument("--repo", type=Path, default=None, help="run Switchyard from this source tree")
    args = parser.parse_args()
    import uvloop

    cores = os.cpu_count() or 1
    fake = FakeProvider()
    fake.start()
    stack = Switchyard(fake.api_base, {}, args.repo)
    stack.start()
    try:
        ep = stack.endpoint()
        uvloop.run(loadgen.warm_up(ep, stream=args.stream, seconds=5))
        for connections in (int(c) for c in args.connections.split(",")):
            before, (idle0, all0) = procstat.snapshot(stack.roots), machine_ticks()
            load = uvloop.run(loadgen.closed_loop(ep, connections, args.seconds, stream=args.stream))
            cpu = procstat.cpu_delta(before, procstat.snapshot(stack.roots))
            idle1, all1 = machine_ticks()
            ok = max(1, int(load["ok"]))
            shares = {label: round(ms / 1000 / args.seconds, 2) for label, ms in sorted(cpu.items())}
            print(f"connections={connections} req/s={load['rps']} mean_ms={load['latency_ms']['mean']} "
                  f"p99_ms={load['latency_ms']['p99']} cpu_ms_per_req={sum(cpu.values()) / ok:.3f} "
                  f"machine_idle_cores={(idle1 - idle0) / (all1 - all0) * cores:.2f} errors={load['errors']}")
            print(f"    cores by process: {shares}", flush=True)
    finally:
        stack.stop()
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
