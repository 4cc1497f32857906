"""Storing what PostgreSQL may refuse for good: keep such values out where that is cheap, and when one slips
through, find the rows it refuses (bisecting the batch) so that the rest is stored and the consumer moves on.

A batch writer that retries every database error forever stalls on a row PostgreSQL can never take (an
integer too large for its column, a NUL byte in text or JSON, a numeric out of range): every later message
of its partitions waits behind it. `store_or_isolate` tells such a *permanent data error* apart from what
retrying can fix (a connection lost, a serialization failure, a missing table while migrations run), which
it raises for the caller to retry, and splits the batch in halves until each refused row stands alone:
one refused row among n costs about 2·log2(n) extra transactions, and every other row is stored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from switchyard.shared.retry import attempts

T = TypeVar("T")
R = TypeVar("R")

_PERMANENT_STATES = ("23502", "23514", "54000")
"""Besides class 22 (data exception): a NOT NULL or CHECK constraint a row breaks, a value over a limit of
the server (an index row too large). Everything else (connections, serialization failures and deadlocks,
missing tables or columns, a full disk) is no property of one row, so it is retried, never dead-lettered."""

_ARGUMENT = re.compile(r"invalid input for query argument (\$\d+)(?: in element #\d+)?: .*\((.*)\)\s*$", re.S)
MAX_ERROR_CHARS = 300


def permanent_data_error(error: BaseException) -> str | None:
    """The database's message when `error` is a refusal of the data itself, which no retry can change; else
    None. The message is the server's primary message (never its DETAIL or CONTEXT, which may quote the
    data); for a value the driver cannot encode, the argument and why, without the value."""
    if not isinstance(error, asyncpg.PostgresError):
        return None
    state = getattr(error, "sqlstate", None)
    if not isinstance(state, str) or not (state.startswith("22") or state in _PERMANENT_STATES):
        return None
    message = getattr(error, "message", None)
    if not message:  # asyncpg refused to encode an argument: its text quotes the value
        found = _ARGUMENT.match(str(error))
        message = f"invalid input for query argument {found[1]} ({found[2]})" if found else "invalid input"
    return f"{message} (SQLSTATE {state})"[:MAX_ERROR_CHARS]


@dataclass
class Refused:
    """An item the database refused for good, and its message."""

    item: Any
    error: str


async def store_or_isolate(items: Sequence[T], store: Callable[[Sequence[T]], Awaitable[R]]
                           ) -> tuple[list[R], list[Refused]]:
    """Store `items` with `store` (one transaction per call); on a permanent data error, store each half on
    its own, down to single items, which are returned as refused. Returns the results of the calls that
    committed, and the refused items in their order. Any other error propagates: the caller retries the whole
    batch, so `store` must be idempotent (what a first try committed is stored once)."""
    try:
        return [await store(items)], []
    except asyncpg.PostgresError as e:
        message = permanent_data_error(e)
        if message is None:
            raise
        if len(items) == 1:
            return [], [Refused(items[0], message)]
    half = len(items) // 2
    left, left_refused = await store_or_isolate(items[:half], store)
    right, right_refused = await store_or_isolate(items[half:], store)
    return left + right, left_refused + right_refused


UNAVAILABLE = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)
"""What `store_until_stored` retries: the database unreachable (refused, timed out, a connection lost), or
refusing what a later try may take."""


async def store_until_stored(items: Sequence[T], store: Callable[[Sequence[T]], Awaitable[R]], *,
                             log: logging.Logger, what: str, extra: dict[str, Any] | None = None
                             ) -> tuple[list[R], list[Refused]]:
    """`store_or_isolate`, retried without end while the database is unavailable (waits from 0.5 s doubling
    to 5 s), logging a warning "database unavailable; retrying {what}" each time. It never gives up: its
    callers hold the batch's Kafka offsets uncommitted until it returns, so dropping the batch would lose it."""
    async for attempt in attempts(UNAVAILABLE, first_s=0.5, max_s=5.0):
        with attempt:
            try:
                return await store_or_isolate(items, store)
            except UNAVAILABLE as e:
                log.warning(f"database unavailable; retrying {what}", extra={**(extra or {}), "error": repr(e)[:300]})
                raise
    raise AssertionError("unreachable: the attempts never end")
