"""Every provider call lands in PostgreSQL, priced, exactly once; spend is queryable by CLI, API and SQL."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import httpx
import orjson
import pytest
from sqlalchemy import text

from switchyard.services.accounting.budgets import TOTALS_COLUMNS
from switchyard.services.accounting.ledger import USAGE_COLUMNS, to_row, write_batch
from switchyard.services.accounting.prompt_log import PROMPT_LOG_COLUMNS
from switchyard.shared.contracts import IN_DOUBT, Usage, UsageEvent
from switchyard.shared.db import make_engine, usage
from switchyard.shared.pg import Database, Query
from switchyard.shared.pricing import cost, lookup
from tests.stack import RunningStack


async def _rows(database_url: str, request_id: str, wait_s: float = 20.0) -> list[dict[str, object]]:
    engine = make_engine(database_url, pool_size=1)
    try:
        deadline = time.time() + wait_s
        while True:
            async with engine.connect() as conn:
                rows = [dict(r) for r in (await conn.execute(
                    text("SELECT * FROM usage WHERE request_id = :rid ORDER BY attempt"), {"rid": request_id}
                )).mappings()]
            # A call's row is written twice: in doubt (status 0) before the call, then completed.
            if (rows and all(r["status"] != 0 for r in rows)) or time.time() > deadline:
                return rows
            await asyncio.sleep(0.2)
    finally:
        await engine.dispose()


async def test_a_request_becomes_one_priced_usage_row(stack: RunningStack) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(), json={
            "model": "gpt-test", "messages": [{"role": "user", "content": "count my tokens please"}]})
    assert r.status_code == 200
    usage = r.json()["usage"]
    rows = await _rows(stack.database_url, r.headers["x-request-id"])
    assert len(rows) == 1
    row = rows[0]
    assert row["model_group"] == "gpt-test" and row["provider"] == "openai" and row["provider_model"] == "gpt-4o-mini"
    assert row["prompt_tokens"] == usage["prompt_tokens"]
    assert row["completion_tokens"] == usage["completion_tokens"]
    expected, priced = cost("openai", "gpt-4o-mini", Usage(prompt_tokens=usage["prompt_tokens"],
                                                            completion_tokens=usage["completion_tokens"]))
    assert priced and Decimal(row["cost_usd"]) == expected > 0  # type: ignore[arg-type]
    assert row["key_id"] == "master" and row["ok"] is True


async def test_streamed_requests_are_priced_too(stack: RunningStack) -> None:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "stream me"}], "stream": True}
    async with httpx.AsyncClient(timeout=60) as client, client.stream(
            "POST", f"{stack.url}/v1/chat/completions", headers=stack.headers(), json=body) as r:
        rid = r.headers["x-request-id"]
        _ = [line async for line in r.aiter_lines()]
    rows = await _rows(stack.database_url, rid)
    assert len(rows) == 1 and rows[0]["stream"] is True and rows[0]["completion_tokens"] > 0  # type: ignore[operator]


async def test_usage_writes_are_idempotent_by_event_id(stack: RunningStack) -> None:
    event = UsageEvent(event_id="evt-idempotent-1", request_id="req-idem", attempt=0, provider="openai",
                       deployment="gpt-test/0", model_group="gpt-test", provider_model="gpt-4o-mini",
                       usage=Usage(prompt_tokens=10, completion_tokens=5))
    database = Database(stack.database_url, max_size=1)
    try:
        first, _ = await write_batch(database, [to_row(event)])
        again, _ = await write_batch(database, [to_row(event), to_row(event.model_copy(update={"event_id": "evt-2"}))])
    finally:
        await database.close()
    assert (first, again) == (1, 1)
    assert len(await _rows(stack.database_url, "req-idem", wait_s=0)) == 2


async def test_an_outcome_keeps_guardrail_decisions_set_on_its_write_ahead_row(stack: RunningStack) -> None:
    """The prompt-log writer may set a request's guardrail decisions while its row is still in doubt; the outcome
    completing that row must not wipe them (they come from another topic and are never sent again)."""
    started = UsageEvent(event_id="evt-guarded", request_id="req-guarded", attempt=0, provider="openai",
                         deployment="gpt-test/0", model_group="gpt-test", provider_model="gpt-4o-mini",
                         status=IN_DOUBT)
    database = Database(stack.database_url, max_size=1)
    try:
        await write_batch(database, [to_row(started)])
        await database.execute(Query("UPDATE usage SET guardrails = :g WHERE request_id = 'req-guarded'"),
                               {"g": [{"guardrail": "out-pii", "action": "mask"}]})
        await write_batch(database, [to_row(started.model_copy(update={
            "status": 200, "usage": Usage(prompt_tokens=3, completion_tokens=2)}))])
    finally:
        await database.close()
    [row] = await _rows(stack.database_url, "req-guarded", wait_s=0)
    assert row["status"] == 200 and row["completion_tokens"] == 2
    assert row["guardrails"] == [{"guardrail": "out-pii", "action": "mask"}]


def test_pricing_catalogue_entries_have_source_and_date() -> None:
    price = lookup("openai", "gpt-4o-mini")
    assert price is not None and price.source.startswith("https://") and price.date
    usd, priced = cost("openai", "gpt-4o-mini", Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000,
                                                      cached_tokens=500_000))
    assert priced and usd == price.input / 2 + price.cached_input / 2 + price.output
    assert cost("nobody", "unknown-model", Usage(prompt_tokens=5)) == (Decimal(0), False)


def test_spend_cli_and_api_agree(stack: RunningStack) -> None:
    httpx.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(), timeout=60,
               json={"model": "gpt-test", "messages": [{"role": "user", "content": "spend"}]})
    time.sleep(1.5)  # accounting writes in small batches
    result = stack.cli("spend", "--by", "model", "--since", "1h", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["model"]: r for r in orjson.loads(result.stdout)}
    assert rows["gpt-test"]["requests"] >= 1 and rows["gpt-test"]["cost_usd"] > 0
    api = httpx.get(f"{stack.url}/v1/spend", params={"by": "model", "since": "1h"}, headers=stack.headers(),
                    timeout=30)
    assert api.status_code == 200
    api_rows = {r["model"]: r for r in api.json()["data"]}
    assert api_rows["gpt-test"]["requests"] >= rows["gpt-test"]["requests"]
    table = stack.cli("spend", "--by", "day")
    assert table.returncode == 0 and "total" in table.stdout


def test_spend_rejects_bad_arguments(stack: RunningStack) -> None:
    r = httpx.get(f"{stack.url}/v1/spend", params={"since": "yesterday-ish"}, headers=stack.headers(), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "since"
    r = httpx.get(f"{stack.url}/v1/spend", params={"by": "colour"}, headers=stack.headers(), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "by"
    r = httpx.get(f"{stack.url}/v1/spend", timeout=30)
    assert r.status_code == 401


@pytest.mark.parametrize("sql", [
    "SELECT model_group, sum(cost_usd) FROM usage WHERE ts > now() - interval '7 days' GROUP BY 1",
    "SELECT key_id, date_trunc('day', ts) AS day, sum(prompt_tokens), sum(completion_tokens), sum(cost_usd) "
    "FROM usage GROUP BY 1, 2 ORDER BY 2",
])
async def test_readme_sql_runs(stack: RunningStack, sql: str) -> None:
    engine = make_engine(stack.database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text(sql))).all()
    finally:
        await engine.dispose()
    assert rows


async def test_the_columns_accounting_writes_are_the_tables_columns_with_their_types(stack: RunningStack) -> None:
    """Accounting writes through asyncpg with each column's type spelled out (shared/pg.py's unnest_rows): those
    names and types must be the migrated tables' own, or a batch would fail, or round a cost, in production."""
    database = Database(stack.database_url, max_size=1)
    try:
        for table, written, every in (("usage", USAGE_COLUMNS, False), ("prompt_log", PROMPT_LOG_COLUMNS, True),
                                      ("spend_totals", TOTALS_COLUMNS, False)):
            rows = await database.fetch(Query(
                "SELECT attname, format_type(atttypid, atttypmod) AS kind FROM pg_attribute "
                "WHERE attrelid = CAST(CAST(:table AS text) AS regclass) AND attnum > 0 AND NOT attisdropped"),
                {"table": table})
            actual = {r["attname"]: r["kind"] for r in rows}
            assert {name: actual.get(name) for name, _ in written} == dict(written), table
            if every:
                assert set(actual) == {name for name, _ in written}, table
    finally:
        await database.close()
    assert {name for name, _ in USAGE_COLUMNS} | {"guardrails"} == {c.name for c in usage.columns}
