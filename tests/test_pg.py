"""shared/pg.py, the asyncpg layer ingress talks to PostgreSQL through, against a real PostgreSQL of its own.

What ingress relies on: statements with named parameters, JSON in and out as Python values, transactions that
roll back on error, a pool that opens nothing until used (so ingress starts while PostgreSQL is down) and calls
that fail within their timeouts instead of hanging when it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from switchyard.devstack.postgres import EmbeddedPostgres
from switchyard.services.ingress.database import DATABASE_ERRORS
from switchyard.shared.pg import Database, Query, dsn, rows_affected
from tests.fakes.server import free_port


def test_named_parameters_become_positional_once_each_leaving_casts_and_literals_alone() -> None:
    query = Query("SELECT :a::int, 'it''s :not_a_parameter', to_char(now(), 'HH24:MI'), :b, :a WHERE x = ANY(:list)")
    assert query.sql == "SELECT $1::int, 'it''s :not_a_parameter', to_char(now(), 'HH24:MI'), $2, $1 WHERE x = ANY($3)"
    assert query.args({"list": [1], "b": "two", "a": 1, "unused": 0}) == [1, "two", [1]]
    with pytest.raises(KeyError, match="b"):
        query.args({"a": 1, "list": []})


def test_command_status_gives_the_rows_touched() -> None:
    assert rows_affected("UPDATE 3") == 3
    assert rows_affected("INSERT 0 1") == 1
    assert rows_affected("DELETE 0") == 0
    assert rows_affected("CREATE TABLE") == 0


def test_every_url_form_the_settings_accept_reaches_asyncpg_as_postgresql() -> None:
    for url in ("postgresql+asyncpg://u@h:1/d", "postgres://u@h:1/d", "postgresql://u@h:1/d"):
        assert dsn(url) == "postgresql://u@h:1/d"


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pg = EmbeddedPostgres(Path(tmp_path_factory.mktemp("pg")), free_port())
    pg.start()
    try:
        yield pg.url
    finally:
        pg.stop()


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url, connect_timeout_s=5.0, command_timeout_s=5.0, pool_timeout_s=5.0)
    await database.execute(Query("CREATE TABLE IF NOT EXISTS things (id text PRIMARY KEY, doc jsonb, "
                                 "raw json, n bigint NOT NULL DEFAULT 0)"))
    await database.execute(Query("TRUNCATE things"))
    try:
        yield database
    finally:
        await database.close()


_INSERT = Query("INSERT INTO things (id, doc, raw) VALUES (:id, :doc, :raw)")


async def test_json_and_jsonb_go_in_and_come_out_as_python_values(db: Database) -> None:
    doc = {"a": [1, 2.5, None, True], "text": "naïve \u2028", "nested": {"k": "v"}}
    await db.execute(_INSERT, {"id": "x", "doc": doc, "raw": ["plain", "json"]})
    row = await db.fetchrow(Query("SELECT doc, raw, jsonb_typeof(doc) AS kind FROM things WHERE id = :id"), {"id": "x"})
    assert row is not None
    assert row["doc"] == doc and row["raw"] == ["plain", "json"]
    assert row["kind"] == "object"  # stored as an object, not as a JSON string holding one
    await db.execute(_INSERT, {"id": "s", "doc": "just text", "raw": None})
    assert await db.fetchval(Query("SELECT doc FROM things WHERE id = 's'")) == "just text"


async def test_a_transaction_commits_at_the_end_and_rolls_back_on_error(db: Database) -> None:
    async with db.transaction() as conn:
        await conn.execute(_INSERT, {"id": "kept", "doc": {}, "raw": {}})
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await conn.execute(_INSERT, {"id": "lost", "doc": {}, "raw": {}})
            raise RuntimeError("the caller failed half way")
    ids = [row["id"] for row in await db.fetch(Query("SELECT id FROM things ORDER BY id"))]
    assert ids == ["kept"]
    touched = await db.execute(Query("UPDATE things SET n = n + :by"), {"by": 2})
    assert touched == 1


async def test_a_pool_opens_nothing_until_used_and_a_dead_server_fails_the_call_quickly() -> None:
    database = Database(f"postgresql://nobody@127.0.0.1:{free_port()}/none", connect_timeout_s=1.0,
                        command_timeout_s=1.0, pool_timeout_s=1.0)
    try:
        with pytest.raises(DATABASE_ERRORS):
            async with asyncio.timeout(10):  # the pool's timeouts bound it; this keeps a hang from hanging the suite
                await database.fetchval(Query("SELECT 1"))
    finally:
        await database.close()


async def test_a_connection_the_server_closed_costs_at_most_one_failed_call_then_is_replaced(
        db: Database, pg_url: str) -> None:
    async with db.connection() as conn:
        pid = await conn.fetchval(Query("SELECT pg_backend_pid()"))
    killer = Database(pg_url)
    try:
        assert await killer.fetchval(Query("SELECT pg_terminate_backend(:pid)"), {"pid": pid}) is True
    finally:
        await killer.close()
    failures = 0
    for _ in range(3):
        try:
            assert await db.fetchval(Query("SELECT pg_backend_pid()")) != pid
        except DATABASE_ERRORS:
            failures += 1  # the closed socket was not yet seen when the connection was handed out
    assert failures <= 1
    assert await db.fetchval(Query("SELECT 1")) == 1
