"""CPU per provider call of the worker's own call path (`services/workers/calls.call`), against bench/fake_openai.py.

    .venv/bin/python bench/worker_call.py [--concurrency 50] [--requests 5000] [--stream]

Why: issue 12 asks for the worker's cost per call; this isolates it from Kafka and the other services.
It runs exactly what a worker runs per call (translate, send through the pooled client, read, parse,
normalise; for a stream, every chunk through the adapter's parser) at a closed-loop concurrency, and
prints this process's CPU time per call (the fake runs in its own process, so it is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))


async def run(url: str, concurrency: int, n: int, stream: bool) -> None:
    from switchyard.services.workers.calls import call, make_client
    from switchyard.services.workers.providers import get_adapter
    from switchyard.services.workers.providers.base import CallContext
    from switchyard.shared.config_schema import Deployment

    dep = Deployment(provider="openai", model="gpt-4o-mini", api_base=url, api_key="sk-bench")
    adapter = get_adapter("openai")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}
    client = make_client()
    slots = asyncio.Semaphore(concurrency)
    chunks = 0

    async def sink(_: dict[str, Any]) -> None:
        nonlocal chunks
        chunks += 1

    async def one(i: int) -> None:
        async with slots:
            ctx = CallContext(dep, {**body, "stream": stream}, stream, "sk-bench", f"r{i}")
            await call(client, adapter, ctx, on_chunk=sink if stream else None)

    await asyncio.gather(*(one(i) for i in range(min(500, n))))  # warm up: connections, caches
    t, c = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    await client.aclose()
    kind = "stream" if stream else "non-streaming"
    print(f"{kind}: {n / wall:7.0f} calls/s  {cpu * 1000 / n:.3f} ms CPU/call", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    fake = subprocess.Popen([sys.executable, str(BENCH / "fake_openai.py"), "--port", "0"], stdout=subprocess.PIPE)
    try:
        assert fake.stdout is not None
        port = int(fake.stdout.readline().split()[1])
        import uvloop

        uvloop.run(run(f"http://127.0.0.1:{port}/v1", args.concurrency, args.requests, args.stream))
    finally:
        fake.terminate()
        fake.wait()


if __name__ == "__main__":
    main()
