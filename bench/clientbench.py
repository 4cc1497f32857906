"""CPU per request of the worker's upstream HTTP client choices, against bench/fake_openai.py.

    bench/.venv-litellm/bin/python bench/clientbench.py [--concurrency 50] [--requests 3000]

Why: py-spy showed the worker spending over half its CPU in httpx/httpcore/anyio (see
bench/README.md, "Profile findings"). This isolates the client: the same POST + JSON decode, at
the same concurrency, with (a) httpx's own pool as the worker once configured it, (b) aiohttp
directly, as the worker calls it now (services/workers/upstream.py; bench/worker_call.py measures the
worker's whole call path). It needs aiohttp, which the LiteLLM venv has.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

BENCH = Path(__file__).resolve().parent
BODY = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]})
HEADERS = {"content-type": "application/json", "authorization": "Bearer x"}


async def measure(name: str, one: Callable[[], Awaitable[None]], concurrency: int, n: int) -> dict[str, float]:
    """Warm up, then `n` calls at `concurrency`; wall rate and this process's CPU per call."""
    slots = asyncio.Semaphore(concurrency)

    async def task() -> None:
        async with slots:
            await one()

    await asyncio.gather(*(task() for _ in range(min(300, n))))
    t, c = time.perf_counter(), time.process_time()
    await asyncio.gather(*(task() for _ in range(n)))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    print(f"{name:34s} {n / wall:7.0f} req/s  {cpu * 1000 / n:.3f} ms CPU/req", flush=True)
    return {"rps": round(n / wall, 1), "cpu_ms_per_req": round(cpu * 1000 / n, 3)}


async def main_async(url: str, concurrency: int, n: int) -> None:
    import aiohttp
    import httpx

    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=512, max_keepalive_connections=512),
                               timeout=httpx.Timeout(600.0, connect=10.0))

    async def via_httpx(c: httpx.AsyncClient = client) -> None:
        response = await c.send(c.build_request("POST", url, headers=HEADERS, content=BODY), stream=True)
        orjson.loads(await response.aread())
        await response.aclose()

    await measure("httpx (worker's pool, 512)", via_httpx, concurrency, n)
    await client.aclose()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))

    async def via_aiohttp() -> None:
        async with session.post(url, data=BODY, headers=HEADERS) as response:
            orjson.loads(await response.read())

    await measure("aiohttp directly", via_aiohttp, concurrency, n)
    await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    # The fake needs httptools: the project's venv has it, the LiteLLM venv may not.
    project_python = BENCH.parent / ".venv" / "bin" / "python"
    python = str(project_python) if project_python.exists() else sys.executable
    fake = subprocess.Popen([python, str(BENCH / "fake_openai.py"), "--port", "0"], stdout=subprocess.PIPE)
    try:
        assert fake.stdout is not None
        port = int(fake.stdout.readline().split()[1])
        import uvloop

        uvloop.run(main_async(f"http://127.0.0.1:{port}/v1/chat/completions", args.concurrency, args.requests))
    finally:
        fake.terminate()
        fake.wait()


if __name__ == "__main__":
    main()
