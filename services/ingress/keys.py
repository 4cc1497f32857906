"""Virtual keys: issued once, stored as a keyed hash, cached in memory on every ingress replica.

The hot path never reads the database: keys are loaded in the background (retried with
backoff until PostgreSQL answers), refreshed every `REFRESH_S`, and changed within
milliseconds through `llm.keys` events (revocations, updates, budget blocks) that every
replica consumes. Once the keys are loaded, the cache is the whole truth: a token that is not in it is
refused without a database query (a key is only ever created through PostgreSQL, and its `created` event
reaches every replica within milliseconds): the refusal waits only until this replica has read `llm.keys` up to
the moment the request arrived (two polls of it, `CATCH_UP_S` at most), so a key created on another replica
works here at once, and random tokens cost PostgreSQL nothing. Until the keys are loaded, an
unknown key is looked up once and remembered as unknown for a few seconds.

Without PostgreSQL, keys already in the cache keep working (revocation, expiry and budget blocks are checked in
memory); a key that cannot be checked (the cache is not loaded yet) gets a 503 `keys_unavailable` with
Retry-After, never a 401: it may well be valid.

The record and the admin specs live in key_records.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from switchyard.services.ingress.budget_holds import every_budget
from switchyard.services.ingress.database import DATABASE_ERRORS, RETRY_AFTER_S, DatabaseOutage
from switchyard.services.ingress.key_records import BudgetSpec, KeyRecord, KeySpec
from switchyard.shared.contracts import KeyEvent
from switchyard.shared.errors import GatewayError
from switchyard.shared.periods import PERIODS, period_end, period_start
from switchyard.shared.pg import Connection, Database, Query, Record
from switchyard.shared.settings import Settings

__all__ = ["KEY_PREFIX", "REFRESH_S", "BudgetSpec", "KeyRecord", "KeySpec", "KeyStore", "hash_key", "key_hash_secret",
           "keys_unavailable"]

log = logging.getLogger("switchyard.ingress.keys")
KEY_PREFIX = "sk-sy-"
REFRESH_S = 10.0
NEGATIVE_TTL_S = 5.0
LOOKUP_TIMEOUT_S = 3.0
"""Bound on a request-path key lookup (the database's own connect/command timeouts come first)."""
CATCH_UP_S = 2.5
"""The longest a token unknown to the loaded keys waits for `llm.keys` to be read up to its arrival."""

KEY_COLUMNS = ("key_id", "key_hash", "key_prefix", "name", "team", "project", "user_id", "allowed_models", "rpm",
               "tpm", "max_parallel", "budget_usd", "budget_period", "alert_thresholds", "expires_at", "metadata",
               "created_at", "updated_at", "revoked_at", "guardrails", "log_prompts")
"""The columns of virtual_keys (shared/db.py), in table order."""
_JSON_COLUMNS = frozenset({"allowed_models", "alert_thresholds", "metadata", "guardrails"})
"""The JSONB columns (all NOT NULL): a None written to one is stored as JSON null, as it always was."""
_UPDATABLE = tuple(c for c in KEY_COLUMNS if c not in ("key_id", "updated_at"))

_SELECT_KEYS = f"SELECT {', '.join(KEY_COLUMNS)} FROM virtual_keys"
_ALL_KEYS = Query(_SELECT_KEYS)
_KEY_BY_ID = Query(_SELECT_KEYS + " WHERE key_id = :key_id")
_KEY_BY_HASH = Query(_SELECT_KEYS + " WHERE key_hash = :key_hash")
_KEY_EXISTS = Query("SELECT key_id FROM virtual_keys WHERE key_id = :key_id")
_SPENT = Query("SELECT cost_usd FROM spend_totals "
               "WHERE scope = :scope AND scope_id = :scope_id AND period = :period AND period_start = :start")
_SET_BUDGET = Query("""
INSERT INTO budgets (scope, scope_id, budget_usd, budget_period, alert_thresholds)
VALUES (:scope, :scope_id, :amount, :period, :thresholds)
ON CONFLICT (scope, scope_id) DO UPDATE
SET budget_usd = EXCLUDED.budget_usd, budget_period = EXCLUDED.budget_period,
    alert_thresholds = EXCLUDED.alert_thresholds
""")


def _value(column: str) -> str:
    """The SQL for a column's `:column` parameter (a None for a JSONB column is JSON null, not SQL NULL)."""
    return f"COALESCE(:{column}, 'null'::jsonb)" if column in _JSON_COLUMNS else f":{column}"


_INSERT_KEY = Query(f"INSERT INTO virtual_keys ({', '.join(KEY_COLUMNS)}) "
                    f"VALUES ({', '.join(_value(c) for c in KEY_COLUMNS)})")
"""A new key: columns its spec does not set are NULL (none of them has a default but guardrails, always set)."""


@lru_cache(maxsize=64)
def _update_key(columns: tuple[str, ...]) -> Query:
    """Set `columns` (names from `_UPDATABLE` only, never a caller's text) of a key that is not revoked."""
    sets = ", ".join(f"{c} = {_value(c)}" for c in (*columns, "updated_at"))
    return Query(f"UPDATE virtual_keys SET {sets} WHERE key_id = :key_id AND revoked_at IS NULL")


def keys_unavailable() -> GatewayError:
    return GatewayError(503, "This API key cannot be checked right now: the virtual keys are not loaded yet "
                        "(the key database is unreachable). Please retry shortly.", code="keys_unavailable",
                        retry_after_s=RETRY_AFTER_S)


def key_hash_secret(settings: Settings) -> bytes:
    """SWITCHYARD_KEY_SECRET, else a secret derived from the master key (set it explicitly in production,
    so rotating the master key does not invalidate every virtual key)."""
    explicit = os.environ.get("SWITCHYARD_KEY_SECRET")
    if explicit:
        return explicit.encode()
    if not settings.master_key:
        raise SystemExit("virtual keys need SWITCHYARD_KEY_SECRET or SWITCHYARD_MASTER_KEY")
    return hmac.new(settings.master_key.encode(), b"switchyard virtual-key hashing", hashlib.sha256).digest()


def hash_key(secret: bytes, token: str) -> str:
    return hmac.new(secret, token.encode(), hashlib.sha256).hexdigest()



class KeyStore:
    """One replica's cache of the virtual keys, and the admin operations on them: each change is written to
    PostgreSQL first and then reloaded here, so this replica sees its own change at once (others through
    `llm.keys`)."""

    def __init__(self, database: Database, secret: bytes, request_database: Database | None = None) -> None:
        self.database = database
        """For loading and administration."""
        self.request_database = request_database or database
        """For lookups on the request path (short timeouts)."""
        self.secret = secret
        self.by_hash: dict[str, KeyRecord] = {}
        self.by_id: dict[str, KeyRecord] = {}
        self.blocked: dict[str, tuple[float, str]] = {}
        """scope ("key:ID", "team:T", "project:P") -> (blocked until epoch seconds, reason)."""
        self._unknown: dict[str, float] = {}
        self.loaded_at = 0.0
        self.polls = 0
        """How many times the follower of `llm.keys` has polled it (0: nobody follows it in this process)."""
        self._polled = asyncio.Event()
        self.outage = DatabaseOutage(log, "virtual keys", "keys already loaded keep working; other keys get 503 "
                                     "keys_unavailable until it answers")

    @property
    def loaded(self) -> bool:
        """The keys were loaded from PostgreSQL at least once (until then only the master key works)."""
        return self.loaded_at > 0

    # ---- cache -------------------------------------------------------------------------------

    async def load_all(self) -> None:
        async with self.database.connection() as conn:
            rows = await conn.fetch(_ALL_KEYS)
            blocks = await self._current_blocks(conn)
        records = [KeyRecord.from_row(r) for r in rows]
        self.by_hash = {r.key_hash: r for r in records}
        self.by_id = {r.key_id: r for r in records}
        self.blocked = blocks
        self.loaded_at = time.time()

    async def _current_blocks(self, conn: Connection) -> dict[str, tuple[float, str]]:
        """Scopes whose spend in their budget's current period has reached the budget."""
        now = datetime.now(UTC)
        out: dict[str, tuple[float, str]] = {}
        for (scope, scope_id), (amount, period) in (await every_budget(conn)).items():
            total = await conn.fetchval(_SPENT, {"scope": scope, "scope_id": scope_id, "period": period,
                                                 "start": period_start(period, now)})
            if total is not None and Decimal(total) >= amount:
                out[f"{scope}:{scope_id}"] = (period_end(period, now).timestamp(), f"{period} budget of ${amount}")
        return out

    async def reload(self, key_id: str) -> None:
        row = await self.database.fetchrow(_KEY_BY_ID, {"key_id": key_id})
        old = self.by_id.pop(key_id, None)
        if old is not None:
            self.by_hash.pop(old.key_hash, None)
        if row is not None:
            record = KeyRecord.from_row(row)
            self.by_id[key_id] = record
            self.by_hash[record.key_hash] = record

    async def apply(self, event: KeyEvent) -> None:
        if event.action in ("revoked", "updated", "created"):
            try:
                await asyncio.wait_for(self.reload(event.key_id), LOOKUP_TIMEOUT_S)
            except DATABASE_ERRORS as e:
                # The next full load (retried until PostgreSQL answers) picks the change up; a revocation
                # takes effect at once all the same.
                self.outage.failed(e)
                record = self.by_id.get(event.key_id)
                if event.action == "revoked" and record is not None and record.revoked_at is None:
                    record.revoked_at = datetime.now(UTC)
            else:
                self.outage.recovered()
        elif event.action == "budget_exceeded":
            self.blocked[event.key_id] = (float(event.detail.get("until", time.time() + 3600)),
                                          str(event.detail.get("reason", "budget")))
        elif event.action == "budget_reset":
            self.blocked.pop(event.key_id, None)

    def note_poll(self) -> None:
        """The follower of `llm.keys` has applied everything one poll returned."""
        self.polls += 1
        polled, self._polled = self._polled, asyncio.Event()
        polled.set()

    async def _caught_up(self) -> None:
        """Wait until `llm.keys` has been polled twice since now (a poll under way may predate a new event)."""
        if not self.polls:
            return
        target = self.polls + 2
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CATCH_UP_S):
                while self.polls < target:
                    await self._polled.wait()

    # ---- authentication ---------------------------------------------------------------------

    async def authenticate(self, token: str) -> KeyRecord:
        key_hash = hash_key(self.secret, token)
        record = self.by_hash.get(key_hash)
        if record is None and self.loaded:
            await self._caught_up()
            record = self.by_hash.get(key_hash)
            if record is None:
                raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
        if record is None:
            if self._unknown.get(key_hash, 0) > time.time():
                raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
            row = await self._lookup(key_hash)
            if row is None:
                self._unknown[key_hash] = time.time() + NEGATIVE_TTL_S
                if len(self._unknown) > 10_000:
                    self._unknown.clear()
                raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
            record = KeyRecord.from_row(row)
            self.by_hash[key_hash], self.by_id[record.key_id] = record, record
        if record.revoked_at is not None:
            raise GatewayError(401, f"This API key was revoked at {record.revoked_at.isoformat()}.",
                               code="key_revoked")
        if record.expired():
            assert record.expires_at is not None
            raise GatewayError(401, f"This API key expired at {record.expires_at.isoformat()}.", code="key_expired")
        self.check_budget(record)
        return record

    async def _lookup(self, key_hash: str) -> Record | None:
        """The key's row, or None; a 503 (never a 401) when PostgreSQL cannot tell."""
        if not self.outage.may_try():
            raise keys_unavailable()
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                row = await self.request_database.fetchrow(_KEY_BY_HASH, {"key_hash": key_hash})
        except DATABASE_ERRORS as e:
            self.outage.failed(e)
            raise keys_unavailable() from e
        self.outage.recovered()
        return row

    def check_budget(self, record: KeyRecord) -> None:
        now = time.time()
        for scope in (f"key:{record.key_id}", f"team:{record.team}" if record.team else None,
                      f"project:{record.project}" if record.project else None):
            if scope is None or scope not in self.blocked:
                continue
            until, reason = self.blocked[scope]
            if now >= until:
                del self.blocked[scope]  # a new period has begun
                continue
            reset = datetime.fromtimestamp(until, UTC).isoformat()
            raise GatewayError(429, f"Budget exceeded for {scope.replace(':', ' ')} ({reason}); it resets at {reset}.",
                               type="budget_exceeded", code="budget_exceeded", retry_after_s=until - now)

    # ---- administration ---------------------------------------------------------------------

    async def create(self, spec: dict[str, Any]) -> tuple[KeyRecord, str]:
        token = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        values = {**spec, "key_id": key_id, "key_hash": hash_key(self.secret, token), "key_prefix": token[:10],
                  "created_at": datetime.now(UTC), "updated_at": datetime.now(UTC)}
        values.setdefault("allowed_models", [])
        values.setdefault("metadata", {})
        values.setdefault("alert_thresholds", [0.8])
        values["guardrails"] = values.get("guardrails") or []
        unknown = set(values) - set(KEY_COLUMNS)
        if unknown:
            raise ValueError(f"not columns of virtual_keys: {', '.join(sorted(unknown))}")
        await self.database.execute(_INSERT_KEY, {c: values.get(c) for c in KEY_COLUMNS})
        await self.reload(key_id)
        return self.by_id[key_id], token

    async def update(self, key_id: str, changes: dict[str, Any]) -> KeyRecord:
        """Change a key that is not revoked: a revoked key is final (409 `key_revoked`, nothing changed), so an
        edit racing a revocation cannot quietly give a revoked key new limits."""
        unknown = set(changes) - set(_UPDATABLE)
        if unknown:
            raise ValueError(f"not updatable columns of virtual_keys: {', '.join(sorted(unknown))}")
        columns = tuple(c for c in _UPDATABLE if c in changes)
        found = None
        async with self.database.transaction() as conn:
            changed = await conn.execute(_update_key(columns),
                                         {**changes, "updated_at": datetime.now(UTC), "key_id": key_id})
            if changed == 0:
                found = await conn.fetchrow(_KEY_EXISTS, {"key_id": key_id})
        if changed == 0:
            if found is None:
                raise GatewayError(404, f"No key {key_id!r}.", param="key_id", code="key_not_found")
            raise GatewayError(409, f"Key {key_id!r} is revoked: it can no longer be changed.", param="key_id",
                               code="key_revoked")
        await self.reload(key_id)
        return self.by_id[key_id]

    async def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key; revoking it again changes nothing (it keeps its first revocation time)."""
        try:
            return await self.update(key_id, {"revoked_at": datetime.now(UTC)})
        except GatewayError as e:
            if e.code != "key_revoked":
                raise
        await self.reload(key_id)
        return self.by_id[key_id]

    async def all_keys(self) -> list[KeyRecord]:
        await self.load_all()
        return sorted(self.by_id.values(), key=lambda r: r.created_at or datetime.min.replace(tzinfo=UTC))

    async def set_budget(self, scope: str, scope_id: str, amount: Decimal, period: str,
                         thresholds: list[float]) -> None:
        """A team or project budget (key budgets live on the key)."""
        if scope not in ("team", "project"):
            raise GatewayError(400, "scope must be team or project", param="scope")
        if period not in PERIODS:
            raise GatewayError(400, f"period must be one of {', '.join(PERIODS)}", param="period")
        await self.database.execute(_SET_BUDGET, {"scope": scope, "scope_id": scope_id, "amount": amount,
                                                  "period": period, "thresholds": thresholds})
