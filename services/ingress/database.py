"""PostgreSQL as ingress sees it: optional at run time, and never a reason for a 500 or a hung request.

Two connection pools with timeouts (the request path fails fast; loading keys and the admin API may take
longer), the errors an unreachable, stopping or silent server raises, the 503 answered for them,
and `DatabaseOutage`, which keeps one component from logging or probing once per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from switchyard.shared.errors import GatewayError
from switchyard.shared.pg import Database

log = logging.getLogger("switchyard.ingress.database")

RETRY_AFTER_S = 3.0
"""Retry-After of the 503s answered while PostgreSQL is unreachable."""

DATABASE_ERRORS: tuple[type[Exception], ...] = (
    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
"""What a call to an unreachable, stopping or hanging PostgreSQL raises: refused or timed-out connections and
pool checkouts (OSError, TimeoutError) and asyncpg's own errors (a connection lost mid-call, a server
shutting down)."""


def admin_database(url: str) -> Database:
    """Loading keys and the admin API (a spend report may take a while)."""
    return Database(url, connect_timeout_s=5.0, command_timeout_s=30.0, pool_timeout_s=5.0)


def request_database(url: str) -> Database:
    """The request path: rate-limit reservations and lookups of keys not in the cache."""
    return Database(url, connect_timeout_s=2.0, command_timeout_s=2.0, pool_timeout_s=1.0)


REFUSED_VALUE_ERRORS: tuple[type[Exception], ...] = (asyncpg.DataError, ValueError, OverflowError)
"""A value the request carried that PostgreSQL refused (class 22 data exceptions: a number out of range, text
with a NUL character) or that asyncpg refused to send (a ValueError, e.g. an integer past int32): the
request's fault, a 400, not an outage."""


def refused_value(error: BaseException) -> bool:
    """Whether `error`, or what caused it, is a REFUSED_VALUE_ERRORS."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, REFUSED_VALUE_ERRORS):
            return True
        todo += [e.__cause__, e.__context__]
    return False


def database_unavailable(what: str = "This request") -> GatewayError:
    return GatewayError(503, f"{what} needs the accounting database (PostgreSQL), which is unreachable right now. "
                        "Please retry shortly.", code="database_unavailable", retry_after_s=RETRY_AFTER_S)


@contextmanager
def database_errors_as_503(what: str = "This request") -> Iterator[None]:
    """Turn a failed or timed-out PostgreSQL call into a 503 + Retry-After OpenAI-style error (never a 500),
    and a value PostgreSQL refused into a 400 (`refused_value`)."""
    try:
        yield
    except DATABASE_ERRORS as e:
        if refused_value(e):
            raise GatewayError(400, "A value in the request cannot be stored (out of range, or text with a NUL "
                               "character).", code="invalid_value") from e
        log.warning("database call failed", extra={"what": what, "error": repr(e)[:300]})
        raise database_unavailable(what) from e


class DatabaseOutage:
    """Whether PostgreSQL failed this component's last call: one warning per outage, not one per call.

    While it is down, `may_try` lets one caller through every `retry_s` to probe, so requests do not
    each wait for a connection attempt; the first call that succeeds ends the outage.
    """

    def __init__(self, logger: logging.Logger, what: str, consequence: str, retry_s: float = 2.0) -> None:
        self.log = logger
        self.what = what
        self.consequence = consequence
        self.retry_s = retry_s
        self.since: float | None = None
        self._next_try = 0.0

    @property
    def down(self) -> bool:
        return self.since is not None

    def may_try(self) -> bool:
        if self.since is None:
            return True
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + self.retry_s
        return True

    def failed(self, error: BaseException) -> None:
        now = time.monotonic()
        self._next_try = now + self.retry_s
        if self.since is None:
            self.since = now
            self.log.warning(f"PostgreSQL unreachable for {self.what}: {self.consequence}",
                             extra={"error": repr(error)[:300]})

    def recovered(self) -> None:
        if self.since is not None:
            self.log.warning(f"PostgreSQL answers again for {self.what}",
                             extra={"outage_s": round(time.monotonic() - self.since, 1)})
            self.since = None
