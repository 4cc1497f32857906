"""Provider pacing: the queue is the feature. Batch work beyond a provider's limit waits in Kafka
instead of failing; keys rotate; interactive callers still get an answer within their deadline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson

from switchyard.batch import run_batch
from tests.conftest import Fakes
from tests.stack import RunningStack


def _batch_file(path: Path, model: str, n: int) -> None:
    path.write_bytes(b"\n".join(orjson.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"item {i}"}]}}) for i in range(n)))


def test_batch_beyond_the_provider_limit_waits_instead_of_failing(stack: RunningStack, fakes: Fakes,
                                                                  tmp_path: Path) -> None:
    """1,000 batch requests against a provider that allows 600 per minute: all answered, no 429 anywhere."""
    _batch_file(tmp_path / "in.jsonl", "paced", 1000)

    async def interactive_during_backlog() -> httpx.Response:
        await asyncio.sleep(15)  # the first minute's 600 calls are spent by now
        async with httpx.AsyncClient(timeout=30) as client:
            return await client.post(f"{stack.url}/v1/chat/completions", headers={**stack.headers(),
                                     "x-switchyard-timeout": "3"},
                                     json={"model": "paced", "messages": [{"role": "user", "content": "now"}]})

    async def both() -> tuple[dict[str, int], httpx.Response]:
        batch = asyncio.create_task(run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", stack.bootstrap,
                                              quiet=True))
        interactive = await interactive_during_backlog()
        return await batch, interactive

    started = time.monotonic()
    counts, interactive = asyncio.run(both())
    elapsed = time.monotonic() - started
    results = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert counts == {"total": 1000, "succeeded": 1000, "failed": 0}
    assert sorted(r["custom_id"] for r in results) == sorted(f"r{i}" for i in range(1000))
    assert all(r["response"]["status_code"] == 200 for r in results)
    assert fakes.limited.rejected == 0  # the provider never had to refuse a call
    assert fakes.limited.max_in_window <= 600  # by the provider's own count, in any 60 s window
    assert elapsed > 55  # the backlog waited for the next window instead of being sent
    # An interactive caller is not made to wait past its deadline behind the batch backlog.
    assert interactive.status_code in (200, 429, 504), interactive.text
    if interactive.status_code != 200:
        assert interactive.json()["error"]["code"] in ("rate_limit_exceeded", "timeout")


def test_keys_rotate_and_spread_load(stack: RunningStack, fakes: Fakes) -> None:
    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            return [r.status_code for r in await asyncio.gather(*[
                client.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(),
                            json={"model": "rotated", "messages": [{"role": "user", "content": str(i)}]})
                for i in range(40)])]

    codes = asyncio.run(run())
    assert codes.count(200) == 40
    per_key = {key: len(window) for key, window in fakes.rotated.windows.items()}
    assert per_key == {"Bearer sk-rot-a": 20, "Bearer sk-rot-b": 20}
    assert fakes.rotated.rejected == 0


def test_provider_429_pauses_the_key_and_retries_instead_of_failing(stack: RunningStack, fakes: Fakes,
                                                                    tmp_path: Path) -> None:
    fakes.limited.inject(status=429, retry_after=1, times=3)
    _batch_file(tmp_path / "in.jsonl", "paced", 5)
    counts = asyncio.run(run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", stack.bootstrap, quiet=True))
    assert counts["succeeded"] == 5
    assert len(fakes.limited.calls("/chat/completions")) == 5 + 3
