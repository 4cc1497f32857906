"""PostgreSQL through asyncpg alone: a lazily opened pool with timeouts, and statements with named parameters.

The services talk to PostgreSQL through this module, not SQLAlchemy, which would cost each about 21 MB of memory
(docs/decisions/ingress-memory.md). What it guarantees:
- `Database` opens no connection until the first call, so a process starts while PostgreSQL is down; each call
  is bounded by the timeouts given (connecting, each command, waiting for a pooled connection), so a stopped
  or silent server fails the call instead of hanging it. A connection the server closed is replaced at the
  next checkout once asyncpg has read the close (a call on it before that fails, and the next one reconnects).
- JSON and JSONB values go in and come out as Python objects (orjson), both ways.
- `Query` is SQL text with `:name` parameters, turned once into asyncpg's `$n` form, so a statement reads
  like the SQL it is and its parameters are passed by name. `::type` casts and quoted literals are left as
  they are.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import asyncpg
import orjson

Record: TypeAlias = asyncpg.Record

_PARAMETER = re.compile(r"'(?:[^']|'')*'|::|:([A-Za-z_]\w*)")


class Query:
    """One SQL statement with `:name` parameters. `args` orders a mapping of them into asyncpg's arguments."""

    def __init__(self, text: str) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match[1]
            if name is None:  # a literal or a cast: as written
                return match[0]
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        self.sql = _PARAMETER.sub(number, text)
        self.names = tuple(names)

    def args(self, params: Mapping[str, Any] | None) -> list[Any]:
        params = params or {}
        missing = [name for name in self.names if name not in params]
        if missing:
            raise KeyError(f"parameters missing for {self.sql[:60]!r}: {', '.join(missing)}")
        return [params[name] for name in self.names]

    def __repr__(self) -> str:
        return f"Query({self.sql!r})"


def rows_affected(status: str) -> int:
    """The row count of a command status (`UPDATE 3`, `INSERT 0 1`, `DELETE 0`); 0 when it has none."""
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


class Connection:
    """A checked-out connection: statements run on it, in its transaction if one is open."""

    def __init__(self, raw: asyncpg.Connection) -> None:
        self.raw = raw

    async def fetch(self, query: Query, params: Mapping[str, Any] | None = None) -> list[Record]:
        rows: list[Record] = await self.raw.fetch(query.sql, *query.args(params))
        return rows

    async def fetchrow(self, query: Query, params: Mapping[str, Any] | None = None) -> Record | None:
        row: Record | None = await self.raw.fetchrow(query.sql, *query.args(params))
        return row

    async def fetchval(self, query: Query, params: Mapping[str, Any] | None = None) -> Any:
        return await self.raw.fetchval(query.sql, *query.args(params))

    async def execute(self, query: Query, params: Mapping[str, Any] | None = None) -> int:
        """Run a command; returns how many rows it touched."""
        return rows_affected(await self.raw.execute(query.sql, *query.args(params)))

    async def executemany(self, query: Query, rows: Sequence[Mapping[str, Any]]) -> None:
        await self.raw.executemany(query.sql, [query.args(row) for row in rows])


def dsn(url: str) -> str:
    """A `postgresql://` URL for asyncpg from any form the settings accept (`postgresql+asyncpg://`, `postgres://`)."""
    for prefix in ("postgresql+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix):]
    return url


async def _json_codecs(connection: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await connection.set_type_codec(name, schema="pg_catalog", format="text",
                                        encoder=lambda value: orjson.dumps(value).decode(), decoder=orjson.loads)


class Database:
    """A pool of at most `max_size` connections to the database at `url`, opened on first use."""

    def __init__(self, url: str, *, connect_timeout_s: float = 60.0, command_timeout_s: float | None = None,
                 pool_timeout_s: float = 30.0, max_size: int = 10) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self.pool_timeout_s = pool_timeout_s
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def _opened(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:  # min_size 0: creating the pool connects nothing
                    self._pool = await asyncpg.create_pool(
                        dsn(self.url), min_size=0, max_size=self.max_size, timeout=self.connect_timeout_s,
                        command_timeout=self.command_timeout_s, init=_json_codecs)
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A connection without a transaction of its own: each statement commits by itself."""
        pool = await self._opened()
        async with pool.acquire(timeout=self.pool_timeout_s) as raw:
            yield Connection(raw)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A connection in a transaction, committed when the block ends, rolled back when it raises."""
        async with self.connection() as connection, connection.raw.transaction():
            yield connection

    async def fetch(self, query: Query, params: Mapping[str, Any] | None = None) -> list[Record]:
        async with self.connection() as connection:
            return await connection.fetch(query, params)

    async def fetchrow(self, query: Query, params: Mapping[str, Any] | None = None) -> Record | None:
        async with self.connection() as connection:
            return await connection.fetchrow(query, params)

    async def fetchval(self, query: Query, params: Mapping[str, Any] | None = None) -> Any:
        async with self.connection() as connection:
            return await connection.fetchval(query, params)

    async def execute(self, query: Query, params: Mapping[str, Any] | None = None) -> int:
        async with self.connection() as connection:
            return await connection.execute(query, params)

    async def close(self) -> None:
        """Close the pool's connections (waiting at most `pool_timeout_s` for those in use)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(self.pool_timeout_s):
                    await pool.close()
            except Exception:  # noqa: BLE001 - closing a pool to a dead server must not fail shutdown
                pool.terminate()


Column = tuple[str, str]
"""A column a statement writes and its PostgreSQL type: `("cost_usd", "numeric(20,10)")`."""

_JSON_TYPES = ("json", "jsonb")


def unnest_rows(columns: Sequence[Column]) -> str:
    """`SELECT * FROM unnest(CAST(:name AS type[]), ...)` over `columns`, in that order.

    An INSERT from it takes its rows as one array per column (`column_arrays`), so its text is the same for
    any number of rows: PostgreSQL prepares and plans it once per connection. (A multi-row VALUES list is a
    new statement for every row count, each prepared and cached per connection.) JSON columns travel as text
    arrays cast to their type, which keeps their values out of the array codec.
    """
    casts = (f"CAST(CAST(:{name} AS text[]) AS {kind}[])" if kind in _JSON_TYPES else f"CAST(:{name} AS {kind}[])"
             for name, kind in columns)
    return f"SELECT * FROM unnest({', '.join(casts)})"


def column_arrays(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """The parameters of an `unnest_rows(columns)` statement: one list per column, JSON values as JSON text."""
    arrays: dict[str, list[Any]] = {}
    for name, kind in columns:
        values = [row[name] for row in rows]
        if kind in _JSON_TYPES:
            values = [None if value is None else orjson.dumps(value).decode() for value in values]
        arrays[name] = values
    return arrays
