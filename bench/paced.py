"""Paced batch: N batch requests through the whole stack against a fake provider that allows L per minute.

Run:  .venv/bin/python bench/paced.py [--requests 1000] [--rpm 600]

Writes bench/results/paced-<date>.json: requests, provider limit, wall time against the ideal N/limit,
the 429s the caller saw and the calls the provider had to refuse (both should be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from switchyard.batch import run_batch  # noqa: E402
from tests.fakes.openai_fake import FakeOpenAI  # noqa: E402
from tests.stack import start_stack, warm_up  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rpm", type=int, default=600)
    args = parser.parse_args()
    fake = FakeOpenAI(rpm_limit=args.rpm).start()
    config = f"""
models:
  - name: paced
    deployments:
      - provider: openai
        model: gpt-4o-mini
        api_base: {fake.url}/v1
        api_key: sk-bench
        rpm: {args.rpm}
"""
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(Path(tmp) / "stack", config)
        try:
            warm_up(stack, "paced")
            fake.reset()
            lines = [orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "paced", "messages": [{"role": "user", "content": f"n {i}"}]}})
                     for i in range(args.requests)]
            (Path(tmp) / "in.jsonl").write_bytes(b"\n".join(lines))
            started = time.monotonic()
            counts = asyncio.run(run_batch(Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl", stack.bootstrap))
            wall = time.monotonic() - started
            results = [orjson.loads(x) for x in (Path(tmp) / "out.jsonl").read_bytes().splitlines()]
        finally:
            stack.stop()
            fake.stop()
    caller_429 = sum(1 for r in results if r["response"]["status_code"] == 429)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python bench/paced.py --requests {args.requests} --rpm {args.rpm}",
        "machine": {"cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "requests": args.requests,
        "provider_limit_rpm": args.rpm,
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "wall_time_s": round(wall, 2),
        "ideal_n_over_limit_s": round(args.requests / args.rpm * 60, 2),
        "ideal_with_window_burst_s": round(max(0, (args.requests - 1) // args.rpm) * 60, 2),
        "caller_429s": caller_429,
        "provider_429s": fake.rejected,
        "provider_max_calls_in_60s": fake.max_in_window,
    }
    out = Path(__file__).parent / "results" / f"paced-{datetime.now(UTC):%Y-%m-%d}.json"
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
