"""Random bearer tokens against a running stack, and the PostgreSQL work they cause, read from PostgreSQL itself.

Two floods, each of `n` requests with a fresh random `sk-sy-...` token (the virtual-key prefix, so each one
reaches the key store; a token without it is refused before any lookup):

- **one address**: every request from the bench's own address, as one attacker would send them. Past
  `SWITCHYARD_AUTH_FAILURE_LIMIT` failures a minute (default 30) ingress answers 429 `too_many_auth_failures`
  before looking at the token: the report gives how many were refused (401) and how many throttled (429).
- **spread**: each request with its own `X-Forwarded-For` address (ingress trusts it from 127.0.0.1, uvicorn's
  default for a local proxy), as a botnet would send them: the throttle never trips, so every token goes the
  whole way through the key store. This is the flood that would reach PostgreSQL if anything did.

PostgreSQL's own counters decide: `pg_stat_statements` (calls per statement in the gateway's database; the
bench preloads the extension into the embedded cluster) and `pg_stat_database` (transactions). Other loops
touch PostgreSQL on their own (the key refresh every 10 s, the batch lease loop, accounting), so each flood is
followed by a control: the same counters over an idle interval of the same length. Attributable to the tokens:
the key lookup statement (`... WHERE virtual_keys.key_hash = $1`, what a random token would cost if it reached
PostgreSQL at all) and any statement that ran during a flood but neither before the floods (pg_stat_statements
counts from the server's start) nor in any idle control (each watched for at least 35 s). The totals of both
intervals are reported too; they differ by how the periodic loops fall into each interval.

Each refusal of the spread flood waits until ingress has read `llm.keys` up to the request (two polls, at most
2.5 s, so a key created on another replica works at once); at 50 in flight that is ~20 refusals a second, so
the spread flood runs at its own, higher concurrency.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from typing import Any

import asyncpg
import httpx

REFERENCE_S = 35.0
"""The shortest idle interval whose statements tell the periodic loops' kinds (the key refresh runs every 10 s)."""
SETTLE_S = 5.0
"""Before a flood's counters are first read: the usage a check request before it caused is written by then."""
KEY_LOOKUP_MARK = "virtual_keys.key_hash ="
"""How the request-path key lookup (services/ingress/keys.py `_lookup`) reads in pg_stat_statements."""


def _admin_dsn(database_url: str) -> tuple[str, str]:
    """The server's `postgres` database (the bench's own queries land there, not in the gateway's counters),
    and the gateway's database name."""
    url = database_url.replace("postgresql+asyncpg://", "postgresql://")
    base, _, name = url.rpartition("/")
    return f"{base}/postgres", name.split("?")[0]


class PgCounters:
    """Reads the gateway database's statement and transaction counters from a connection to another database."""

    def __init__(self, database_url: str) -> None:
        self.dsn, self.dbname = _admin_dsn(database_url)
        self.statements = False

    async def prepare(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            preloaded = await conn.fetchval("SHOW shared_preload_libraries")
            if "pg_stat_statements" in (preloaded or ""):
                await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                self.statements = True
        finally:
            await conn.close()

    async def read(self) -> dict[str, Any]:
        conn = await asyncpg.connect(self.dsn)
        try:
            row = await conn.fetchrow(
                "SELECT xact_commit + xact_rollback AS xacts, tup_fetched, tup_returned FROM pg_stat_database "
                "WHERE datname = $1", self.dbname)
            out: dict[str, Any] = {"xacts": int(row["xacts"]), "tup_fetched": int(row["tup_fetched"]),
                                   "tup_returned": int(row["tup_returned"]), "statements": {}}
            if self.statements:
                rows = await conn.fetch(
                    "SELECT query, sum(calls)::bigint AS calls FROM pg_stat_statements s JOIN pg_database d "
                    "ON d.oid = s.dbid WHERE d.datname = $1 GROUP BY query", self.dbname)
                out["statements"] = {r["query"]: int(r["calls"]) for r in rows}
            return out
        finally:
            await conn.close()


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two reads: transactions, tuples, and calls per statement (those that ran)."""
    calls = {q: n - before["statements"].get(q, 0) for q, n in after["statements"].items()}
    calls = {q: n for q, n in calls.items() if n > 0}
    return {"xacts": after["xacts"] - before["xacts"], "tup_fetched": after["tup_fetched"] - before["tup_fetched"],
            "statement_calls": sum(calls.values()), "statements": sorted(calls),
            "key_lookups": sum(n for q, n in calls.items() if KEY_LOOKUP_MARK in q),
            "by_statement": dict(sorted(calls.items(), key=lambda kv: -kv[1])[:12])}


def random_address(i: int) -> str:
    """A distinct public-looking IPv4 address per request (198.18.0.0/15 is reserved for benchmarks)."""
    return f"198.{18 + (i >> 16) % 2}.{(i >> 8) & 255}.{i & 255}"


async def flood(url: str, n: int, concurrency: int, spread: bool) -> dict[str, Any]:
    """`n` chat requests, each with a fresh random virtual-key-shaped token; status and error code counts."""
    statuses: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    retry_after = 0
    next_i = 0
    body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}]}

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal next_i, retry_after
        while next_i < n:
            i, next_i = next_i, next_i + 1
            headers = {"authorization": f"Bearer sk-sy-{secrets.token_urlsafe(24)}"}
            if spread:
                headers["x-forwarded-for"] = random_address(i)
            try:
                r = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1
                continue
            statuses[str(r.status_code)] += 1
            retry_after += "retry-after" in r.headers
            try:
                codes[str(r.json()["error"]["code"])] += 1
            except (ValueError, KeyError, TypeError):
                codes["(no OpenAI error body)"] += 1

    began = time.monotonic()
    # Idle connections are let go before uvicorn's 5 s keep-alive timeout closes them: reusing one the server is
    # closing at that moment fails as a ReadError on the client, which is no answer of the gateway's.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=4.0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(*(one(client) for _ in range(concurrency)))
    elapsed = time.monotonic() - began
    return {"requests": n, "concurrency": concurrency, "seconds": round(elapsed, 1),
            "req_per_s": round(n / elapsed, 1) if elapsed else None, "status": dict(statuses),
            "codes": dict(codes), "with_retry_after": retry_after}


async def auth_failures_metric(url: str) -> float | None:
    """`switchyard_auth_failures_total` as ingress exports it."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{url}/metrics")).text
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("switchyard_auth_failures_total")]
    return sum(values) if values else None


async def measured_flood(url: str, pg: PgCounters, n: int, concurrency: int, spread: bool,
                         say: Any = print) -> dict[str, Any]:
    """A flood, then an idle control of the same length, PostgreSQL counters around both."""
    await asyncio.sleep(SETTLE_S)
    failures_before = await auth_failures_metric(url)
    first = await pg.read()
    result = await flood(url, n, concurrency, spread)
    second = await pg.read()
    failures_after = await auth_failures_metric(url)
    say(f"  flood ({'spread' if spread else 'one address'}): {result['status']} in {result['seconds']} s; "
        f"idle control for as long")
    await asyncio.sleep(result["seconds"])
    third = await pg.read()
    during, control = delta(first, second), delta(second, third)
    if result["seconds"] < REFERENCE_S:  # long enough for every periodic loop to show its statements
        await asyncio.sleep(REFERENCE_S - result["seconds"])
        reference = delta(second, await pg.read())
    else:
        reference = control
    idle_kinds = set(reference["statements"])
    flood_kinds = during.pop("statements")
    control.pop("statements")
    result.update({
        "auth_failures_counted": (failures_after - failures_before)
        if failures_before is not None and failures_after is not None else None,
        "pg_during": during, "pg_control": control,
        "pg_statement_calls_attributable": during["statement_calls"] - control["statement_calls"],
        "pg_xacts_attributable": during["xacts"] - control["xacts"],
        "pg_key_lookups": during["key_lookups"], "statement_kinds": (flood_kinds, idle_kinds)})
    return result


async def valid_request(url: str, key: str, address: str | None = None) -> dict[str, Any]:
    """One ordinary request with a valid key (from `address` through X-Forwarded-For, when given)."""
    headers = {"authorization": f"Bearer {key}"}
    if address:
        headers["x-forwarded-for"] = address
    began = time.monotonic()
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(f"{url}/v1/chat/completions", headers=headers,
                              json={"model": "bench", "messages": [{"role": "user", "content": "still there?"}]})
    return {"status": r.status_code, "ms": round((time.monotonic() - began) * 1000, 1)}


async def served_again(url: str, key: str, limit_s: float = 90.0) -> float | None:
    """Seconds until the flooding address itself is answered again (its throttle minute ends), or None."""
    began = time.monotonic()
    while time.monotonic() - began < limit_s:
        if (await valid_request(url, key))["status"] == 200:
            return round(time.monotonic() - began, 1)
        await asyncio.sleep(1.0)
    return None


async def run(url: str, database_url: str, master_key: str, n: int, concurrency: int, spread_concurrency: int,
              say: Any = print) -> dict[str, Any]:
    """Both floods against a stack whose keys are loaded; a valid virtual key must still work after each."""
    pg = PgCounters(database_url)
    await pg.prepare()
    async with httpx.AsyncClient(timeout=30) as client:
        created = await client.post(f"{url}/v1/keys", headers={"authorization": f"Bearer {master_key}"},
                                    json={"name": "abuse-bench"})
        created.raise_for_status()
        key = created.json()["key"]
        deadline = time.monotonic() + 60
        while not (await client.get(f"{url}/ready")).json().get("keys_loaded"):
            if time.monotonic() > deadline:
                raise RuntimeError("the virtual keys were never loaded")
            await asyncio.sleep(0.5)
    before = await valid_request(url, key)
    if before["status"] != 200:
        raise RuntimeError(f"a valid virtual key was refused before the floods: {before}")
    out: dict[str, Any] = {"pg_stat_statements": pg.statements, "valid_key_before": before}
    since_start = set((await pg.read())["statements"])  # every kind PostgreSQL ran since it started
    say(f"bad tokens: {n} from one address, concurrency {concurrency}")
    out["one_address"] = await measured_flood(url, pg, n, concurrency, spread=False, say=say)
    out["one_address"]["valid_key_after_other_address"] = await valid_request(url, key, "198.51.100.7")
    say(f"bad tokens: {n} from {n} addresses (X-Forwarded-For), concurrency {spread_concurrency}")
    out["spread"] = await measured_flood(url, pg, n, spread_concurrency, spread=True, say=say)
    out["spread"]["valid_key_after"] = await valid_request(url, key, "198.51.100.8")
    out["flooding_address_served_again_after_s"] = await served_again(url, key)
    # Statements of every idle interval are the background's (some loops run once a minute or less often).
    floods = (out["one_address"], out["spread"])
    idle = since_start.union(*(f["statement_kinds"][1] for f in floods))
    for f in floods:
        f["pg_statements_only_during_flood"] = sorted(set(f.pop("statement_kinds")[0]) - idle)
    return out
