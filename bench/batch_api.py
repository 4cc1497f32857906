"""The Batches API under a provider limit: N lines through `/v1/batches` against a fake allowing L per minute.

Run:  .venv/bin/python bench/batch_api.py [--lines 2000] [--rpm 600]

Uploads the lines with the openai SDK, creates the batch, polls it until it ends and reads its output file.
Writes bench/results/batch-api-<date>.json: wall time from create to completed against the ideal N/L minutes
(200 s for the defaults), the 429s in the output (returned to the caller: must be 0) and the calls the
provider had to refuse. A bench, not a test: it takes minutes and its figures depend on the machine.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.openai_fake import FakeOpenAI  # noqa: E402
from tests.stack import MASTER_KEY, start_stack, warm_up  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--no-save", action="store_true", help="print the report only (smoke runs)")
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
            sdk = OpenAI(base_url=f"{stack.url}/v1", api_key=MASTER_KEY, max_retries=5)
            raw = b"".join(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                         "body": {"model": "paced",
                                                  "messages": [{"role": "user", "content": f"n {i}"}]}}) + b"\n"
                           for i in range(args.lines))
            file = sdk.files.create(file=("bench.jsonl", io.BytesIO(raw)), purpose="batch")
            started = time.monotonic()
            batch = sdk.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
            while batch.status not in ("completed", "failed", "cancelled", "expired"):
                time.sleep(1.0)
                batch = sdk.batches.retrieve(batch.id)
            wall = time.monotonic() - started
            lines = [orjson.loads(x) for fid in (batch.output_file_id, batch.error_file_id) if fid
                     for x in sdk.files.content(fid).read().splitlines()]
        finally:
            stack.stop()
            fake.stop()
    statuses = [line["response"]["status_code"] if line["response"] else None for line in lines]
    counts = batch.request_counts
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python bench/batch_api.py --lines {args.lines} --rpm {args.rpm}",
        "machine": {"cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "lines": args.lines,
        "provider_limit_rpm": args.rpm,
        "status": batch.status,
        "completed": counts.completed if counts else None,
        "failed": counts.failed if counts else None,
        "results": len(lines),
        "distinct_custom_ids": len({line["custom_id"] for line in lines}),
        "wall_time_s": round(wall, 2),
        "ideal_n_over_limit_s": round(args.lines / args.rpm * 60, 2),
        "ideal_with_window_burst_s": round(max(0, (args.lines - 1) // args.rpm) * 60, 2),
        "caller_429s": statuses.count(429),
        "provider_429s": fake.rejected,
        "provider_max_calls_in_60s": fake.max_in_window,
    }
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2)
    if not args.no_save:
        out = Path(__file__).parent / "results" / f"batch-api-{datetime.now(UTC):%Y-%m-%d}.json"
        out.write_bytes(text)
    print(text.decode())


if __name__ == "__main__":
    main()
