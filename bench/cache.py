"""Response cache benchmark (issue 13): what a hit costs, how many hits a replica serves, what a trace saves.

It starts its own stack (`switchyard up`: embedded Apache Kafka and PostgreSQL, every service) in front of a
fake OpenAI chat provider that answers after `--latency-ms` (200 by default) and a fake embedding provider
(tests/fakes/embedding_fake.py, no added latency), with the config the README shows: a `cached` group
(`cache: true`, semantic matching through the `embed` group at threshold 0.95) and a `plain` group (no cache).

Figures (written to bench/results/cache-<date>.json and printed):
- `latency`: p50 / p99 of sequential requests, from sending to the full answer, for: an uncached call
  (`plain`, the provider's 200 ms plus the gateway), a miss on `cached` (adds the lookup: one exact query,
  one embedding through the pipeline, one semantic query), an exact hit and a semantic hit. The added latency
  of a hit is its own latency (no provider call happens); the cache's cost on a miss is miss - plain.
- `hit_throughput`: exact hits per second with `--concurrency` callers for `--duration` seconds.
- `trace`: a replayed trace of `--trace` requests where 20 % repeat an earlier request; what `/v1/spend`
  shows afterwards (cost paid, cost saved by hits, hits).

    .venv/bin/python bench/cache.py                 # ~3 min
    .venv/bin/python bench/cache.py --smoke         # ~1.5 min, small numbers

Nothing here asserts: tests/test_cache.py asserts the behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.embedding_fake import FakeEmbeddings, near, random_vector
from tests.fakes.openai_fake import FakeOpenAI
from tests.stack import MASTER_KEY, start_stack, warm_up

RESULTS = Path(__file__).resolve().parent / "results"
HEADERS = {"authorization": f"Bearer {MASTER_KEY}"}


def config(chat: FakeOpenAI, embed: FakeEmbeddings) -> str:
    dep = f"{{provider: openai, model: gpt-4o-mini, api_base: '{chat.url}/v1', api_key: sk-chat}}"
    return f"""
cache:
  ttl_s: 3600
  semantic: {{embedding_model: embed, threshold: 0.95}}
models:
  - {{name: cached, cache: true, deployments: [{dep}]}}
  - {{name: plain, deployments: [{dep}]}}
  - name: embed
    deployments: [{{provider: openai, model: text-embedding-3-small, api_base: '{embed.url}/v1', api_key: sk-e}}]
"""


def body(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 64}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": pct(values, 0.5), "p99_ms": pct(values, 0.99)}


async def timed(client: httpx.AsyncClient, payload: dict[str, Any], expect: str | None) -> float:
    start = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=payload)
    elapsed = (time.perf_counter() - start) * 1000
    if r.status_code != 200 or (expect and r.headers.get("x-switchyard-cache") != expect):
        raise RuntimeError(f"expected {expect}: {r.status_code} {r.headers.get('x-switchyard-cache')} {r.text[:200]}")
    return elapsed


async def wait_stored(client: httpx.AsyncClient, payload: dict[str, Any]) -> None:
    for _ in range(200):
        r = await client.post("/v1/chat/completions", json=payload, headers={"cache-control": "max-age=3600"})
        if r.headers.get("x-switchyard-cache") == "hit":
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("entry never stored")


async def latencies(client: httpx.AsyncClient, embed: FakeEmbeddings, n: int) -> dict[str, Any]:
    out: dict[str, list[float]] = {"plain": [], "miss": [], "exact_hit": [], "semantic_hit": []}
    for i in range(n):
        text = f"bench question {i} {random.random()}"
        paraphrase = f"bench paraphrase {i} {random.random()}"
        embed.vectors[paraphrase] = near(random_vector(text), 0.98, str(i))
        out["plain"].append(await timed(client, body("plain", text), None))
        out["miss"].append(await timed(client, body("cached", text), "miss"))
        await wait_stored(client, body("cached", text))
        out["exact_hit"].append(await timed(client, body("cached", text), "hit"))
        out["semantic_hit"].append(await timed(client, body("cached", paraphrase), "semantic-hit"))
    return {name: summary(values) for name, values in out.items()}


async def throughput(client: httpx.AsyncClient, concurrency: int, duration_s: float) -> dict[str, Any]:
    payload = body("cached", "the one hot question")
    await client.post("/v1/chat/completions", json=payload)
    await wait_stored(client, payload)
    done, stop = 0, time.perf_counter() + duration_s

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await timed(client, payload, "hit")
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return {"concurrency": concurrency, "hits": done, "hits_per_s": round(done / (time.perf_counter() - started), 1)}


async def trace(client: httpx.AsyncClient, n: int, repeat_share: float) -> dict[str, Any]:
    """`n` requests, `repeat_share` of them repeating an earlier one (exactly), against a fresh team's key."""
    key = (await client.post("/v1/keys", json={"team": "bench-trace"})).json()["key"]
    headers = {"authorization": f"Bearer {key}"}
    rng, seen, repeats = random.Random(13), [], 0
    for i in range(n):
        if seen and rng.random() < repeat_share:
            text, repeats = rng.choice(seen), repeats + 1
        else:
            text = f"trace request {i}: " + "lorem ipsum " * rng.randint(5, 60)
            seen.append(text)
        r = await client.post("/v1/chat/completions", json=body("cached", text), headers=headers)
        r.raise_for_status()
        await asyncio.sleep(0.05)  # a trace has gaps: an entry is written before its repeat arrives
    for _ in range(100):  # accounting writes in batches
        rows = (await client.get("/v1/spend", params={"by": "team", "since": "1h"})).json()["data"]
        row = next((r for r in rows if r["team"] == "bench-trace"), None)
        if row and row["requests"] >= n and row["cache_hits"] >= repeats:
            break
        await asyncio.sleep(0.2)
    by_model = (await client.get("/v1/spend", params={"by": "model", "since": "1h"})).json()["data"]
    assert row is not None
    return {"requests": n, "repeats_sent": repeats, "cache_hits": row["cache_hits"], "cost_usd": row["cost_usd"],
            "saved_usd": row["saved_usd"],
            "saved_share": round(row["saved_usd"] / max(row["saved_usd"] + row["cost_usd"], 1e-12), 3),
            "spend_by_model": by_model}


async def run(args: argparse.Namespace, url: str, embed: FakeEmbeddings) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=60,
                                 limits=httpx.Limits(max_connections=args.concurrency + 4)) as client:
        return {"latency": await latencies(client, embed, args.samples),
                "hit_throughput": await throughput(client, args.concurrency, args.duration),
                "trace": await trace(client, args.trace, 0.2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--trace", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="small numbers (~1.5 min)")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.duration, args.trace, args.concurrency = 20, 3.0, 60, 8
    chat, embed = FakeOpenAI().start(), FakeEmbeddings().start()
    chat.inject(latency_ms=args.latency_ms, times=10**9)
    stack = start_stack(Path(tempfile.mkdtemp(prefix="bench-cache-")), config(chat, embed))
    try:
        warm_up(stack, "plain")
        results = asyncio.run(run(args, stack.url, embed))
    finally:
        stack.stop()
        chat.stop()
        embed.stop()
    results["settings"] = {k: v for k, v in vars(args).items()}
    results["provider_calls"] = len(chat.calls("/chat/completions"))
    print(json.dumps({k: v for k, v in results.items() if k != "trace"} | {
        "trace": {k: v for k, v in results["trace"].items() if k != "spend_by_model"}}, indent=2))
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"cache-{dt.date.today().isoformat()}.json"
        out.write_text(json.dumps(results, indent=2))
        print(f"written to {out}")


if __name__ == "__main__":
    main()
