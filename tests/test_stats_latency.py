"""GET /v1/stats/latency and `switchyard stats`: percentiles from the usage rows every replica writes, the same
as computed straight from those rows."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from switchyard.shared.db import make_engine
from tests.conftest import Fakes
from tests.stack import RunningStack

DELAYS_MS = (0, 40, 80, 120, 160)


def percentile_cont(values: list[float], q: float) -> float | None:
    """PostgreSQL's percentile_cont, independently: linear interpolation between the two nearest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def outcome_rows(database_url: str, where: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    engine = make_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(text(
                f"SELECT * FROM usage WHERE status <> 0 AND {where} ORDER BY event_id"), params)).mappings()]
    finally:
        await engine.dispose()


async def wait_stored(database_url: str, request_ids: list[str], calls: int, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while len(await outcome_rows(database_url, "request_id = ANY(:ids)", {"ids": request_ids})) < calls:
        if time.time() > deadline:
            pytest.fail("the calls' outcomes were not stored in time")
        await asyncio.sleep(0.2)


def expected(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["ok"]]
    out: dict[str, Any] = {"requests": len(rows), "errors": len(rows) - len(ok),
                           "error_rate": (len(rows) - len(ok)) / len(rows)}
    for timing, column in (("total_ms", "total_ms"), ("provider_ms", "latency_ms"), ("ttft_ms", "ttft_ms")):
        values = [r[column] for r in ok if r[column] is not None]
        out[timing] = {f"p{int(q * 100)}": percentile_cont(values, q) for q in (0.5, 0.95, 0.99)}
    return out


def close(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)
    return bool(a == b)


async def test_latency_percentiles_match_sql_over_the_same_rows(stack: RunningStack, fakes: Fakes) -> None:
    ids = []
    async with httpx.AsyncClient(timeout=60) as client:
        for delay in DELAYS_MS:
            fakes.slow.inject(latency_ms=delay, times=1)
            r = await client.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(), json={
                "model": "slow", "messages": [{"role": "user", "content": f"after {delay} ms"}]})
            assert r.status_code == 200, r.text
            ids.append(r.headers["x-request-id"])
        async with client.stream("POST", f"{stack.url}/v1/chat/completions", headers=stack.headers(), json={
                "model": "slow", "stream": True, "messages": [{"role": "user", "content": "a stream"}]}) as r:
            assert r.status_code == 200
            await r.aread()
            ids.append(r.headers["x-request-id"])
        fakes.faulty.inject(status=400, times=1)  # the request's own fault: it leaves the breaker closed
        r = await client.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(), json={
            "model": "faulty", "messages": [{"role": "user", "content": "fails"}]})
        assert r.status_code == 400
        ids.append(r.headers["x-request-id"])
    await wait_stored(stack.database_url, ids, len(ids))

    rows = await outcome_rows(stack.database_url, "request_id = ANY(:ids)", {"ids": ids})
    slow_rows = [r for r in rows if r["deployment"] == "slow/0"]
    assert all(r["total_ms"] is not None and r["total_ms"] >= r["latency_ms"] for r in slow_rows)
    assert [r["ttft_ms"] is not None for r in sorted(slow_rows, key=lambda r: r["ts"])] == [False] * 5 + [True]
    assert sorted(r["latency_ms"] for r in slow_rows)[-1] >= DELAYS_MS[-1]  # the injected delay is provider time

    async with httpx.AsyncClient(timeout=60) as client:
        for by, column in (("deployment", "deployment"), ("model", "model_group"), ("provider", "provider")):
            for _ in range(5):  # another test's late outcome could land between the two reads: read again then
                window = await outcome_rows(stack.database_url, "ts >= now() - interval '24 hours'", {})
                r = await client.get(f"{stack.url}/v1/stats/latency", params={"by": by, "window": "24h"},
                                     headers=stack.headers())
                assert r.status_code == 200, r.text
                if window == await outcome_rows(stack.database_url, "ts >= now() - interval '24 hours'", {}):
                    break
            body = r.json()
            assert (body["by"], body["window"], body["unit"]) == (by, "24h", "ms")
            served = {row[by]: row for row in body["data"]}
            groups: dict[str, list[dict[str, Any]]] = {}
            for row in window:
                groups.setdefault(row[column], []).append(row)
            assert served.keys() == groups.keys()
            for group, group_rows in groups.items():
                want = {by: group, **expected(group_rows)}
                assert close(served[group], want), (group, served[group], want)

        r = await client.get(f"{stack.url}/v1/stats/latency", params={"by": "deployment", "window": "5m"},
                             headers=stack.headers())
        recent = {row["deployment"]: row for row in r.json()["data"]}
        assert recent["slow/0"]["requests"] >= 6
        assert recent["slow/0"]["ttft_ms"]["p50"] is not None
        assert recent["faulty/0"]["errors"] >= 1 and recent["faulty/0"]["error_rate"] > 0

    cli = stack.cli("stats", "--by", "deployment", "--window", "5m", "--json")
    assert cli.returncode == 0, cli.stderr
    assert {row["deployment"] for row in orjson.loads(cli.stdout)} >= {"slow/0", "faulty/0"}
    table = stack.cli("stats", "--by", "provider", "--window", "1h")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:4] == ["provider", "requests", "errors", "error_rate"]
    assert any(line.startswith("openai ") for line in table.stdout.splitlines())


@pytest.mark.parametrize(("params", "status", "param"), [
    ({"by": "key"}, 400, "by"), ({"window": "7d"}, 400, "window"), ({"by": "x" * 5000}, 400, "by"),
])
def test_bad_parameters_are_refused_clearly(stack: RunningStack, params: dict[str, str], status: int,
                                            param: str) -> None:
    r = httpx.get(f"{stack.url}/v1/stats/latency", params=params, headers=stack.headers(), timeout=30)
    assert r.status_code == status
    assert r.json()["error"]["param"] == param


def test_needs_the_master_key(stack: RunningStack) -> None:
    r = httpx.get(f"{stack.url}/v1/stats/latency", timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "missing_api_key"
    key = httpx.post(f"{stack.url}/v1/keys", json={"name": "stats-reader"}, headers=stack.headers(), timeout=30)
    assert key.status_code == 201, key.text
    r = httpx.get(f"{stack.url}/v1/stats/latency", headers=stack.headers(key.json()["key"]), timeout=30)
    assert r.status_code == 403
