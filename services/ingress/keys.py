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

Without PostgreSQL, keys already in the cache keep working (revocation, expiry and budget
blocks are checked in memory); a key that cannot be checked (the cache is not loaded yet,
a key that cannot be checked (the cache is not loaded yet) gets a 503 `keys_unavailable` with
Retry-After, never a 401: it may well be valid.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import and_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from switchyard.services.ingress.auth import Identity
from switchyard.services.ingress.database import DATABASE_ERRORS, RETRY_AFTER_S, DatabaseOutage
from switchyard.shared.config import Settings
from switchyard.shared.contracts import KeyEvent
from switchyard.shared.db import budgets, spend_totals, virtual_keys
from switchyard.shared.errors import GatewayError
from switchyard.shared.periods import PERIODS, Period, period_end, period_start

log = logging.getLogger("switchyard.ingress.keys")
KEY_PREFIX = "sk-sy-"
REFRESH_S = 10.0
NEGATIVE_TTL_S = 5.0
LOOKUP_TIMEOUT_S = 3.0
CATCH_UP_S = 2.5
"""The longest a token unknown to the loaded keys waits for `llm.keys` to be read up to its arrival."""
"""Bound on a request-path key lookup (the engine's own connect/command timeouts come first)."""


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


def _aware(value: Any) -> Any:
    """A naive datetime as UTC; anything else as is. asyncpg reads a TIMESTAMPTZ at either end of Python's
    range (0001-01-01 or 9999-12-31 UTC, which it uses for -infinity/infinity) as a naive datetime.min/max,
    and comparing that with an aware `now` raises."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


EXPIRY_RANGE = (datetime(1970, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC))
"""Accepted `expires_at` values: far from the ends of Python's datetime range, where a value stored with a
zone may read back out of range (and then no key could be loaded)."""


def _expiry(value: datetime) -> datetime:
    aware: datetime = _aware(value)
    if not EXPIRY_RANGE[0] <= aware < EXPIRY_RANGE[1]:
        raise ValueError(f"must be between {EXPIRY_RANGE[0].year} and {EXPIRY_RANGE[1].year}")
    return aware


@dataclass
class KeyRecord:
    key_id: str
    key_hash: str
    key_prefix: str
    name: str | None = None
    team: str | None = None
    project: str | None = None
    user_id: str | None = None
    allowed_models: list[str] = field(default_factory=list)
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_usd: Decimal | None = None
    budget_period: str | None = None
    alert_thresholds: list[float] = field(default_factory=lambda: [0.8])
    expires_at: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    guardrails: list[str] = field(default_factory=list)
    log_prompts: bool | None = None

    @classmethod
    def from_row(cls, row: Any) -> KeyRecord:
        data = {k: _aware(row[k]) for k in cls.__dataclass_fields__ if k in row}
        return cls(**data)

    def identity(self) -> Identity:
        meta = {**{k: str(v) for k, v in self.metadata.items()}}
        for name, value in (("team", self.team), ("project", self.project), ("user", self.user_id)):
            if value:
                meta[name] = value
        return Identity(key_id=self.key_id, metadata=meta, allowed_models=list(self.allowed_models), rpm=self.rpm,
                        tpm=self.tpm, max_parallel=self.max_parallel, guardrails=list(self.guardrails or []),
                        log_prompts=self.log_prompts)

    def public(self) -> dict[str, Any]:
        """What the admin API shows: everything but the hash."""
        out: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "key_hash"}
        for k in ("expires_at", "created_at", "revoked_at"):
            out[k] = out[k].isoformat() if out[k] else None
        out["budget_usd"] = float(self.budget_usd) if self.budget_usd is not None else None
        out["status"] = "revoked" if self.revoked_at else "expired" if self.expired() else "active"
        return out

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and (now or datetime.now(UTC)) >= self.expires_at


MAX_INT4 = 2**31 - 1
"""rpm, tpm and max_parallel are INTEGER columns."""
MAX_BUDGET_USD = Decimal(10) ** 14
"""Budgets are NUMERIC(20, 6) columns: below 10^14 dollars."""
Threshold = Annotated[float, Field(ge=0, le=1)]
"""An alert threshold: the fraction of the budget spent that raises an alert."""


class KeySpec(BaseModel):
    """What an admin may set on a key (create and update); unset fields are left alone on update."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    team: str | None = None
    project: str | None = None
    user: str | None = None
    models: list[str] | None = None
    rpm: int | None = Field(default=None, ge=1, le=MAX_INT4)
    tpm: int | None = Field(default=None, ge=1, le=MAX_INT4)
    max_parallel: int | None = Field(default=None, ge=1, le=MAX_INT4)
    budget_usd: Decimal | None = Field(default=None, ge=0, lt=MAX_BUDGET_USD)
    budget_period: Period | None = None
    alert_thresholds: list[Threshold] | None = None
    expires_at: Annotated[datetime, AfterValidator(_expiry)] | None = Field(
        default=None, description="ISO 8601; UTC when no zone is given")
    expires_in: str | None = Field(default=None, description="e.g. 30d, 12h: sets expires_at from now")
    metadata: dict[str, str] | None = None
    guardrails: list[str] | None = Field(default=None, description="extra guardrails (by name), on top of the model's")
    log_prompts: bool | None = Field(default=None, description="store this key's prompts (overrides the config)")

    def columns(self) -> dict[str, Any]:
        data = self.model_dump(exclude_unset=True)
        if "user" in data:
            data["user_id"] = data.pop("user")
        if "models" in data:
            data["allowed_models"] = data.pop("models") or []
        if "expires_in" in data:
            data["expires_at"] = _future(data.pop("expires_in"))
        if data.get("budget_usd") is not None and not data.get("budget_period"):
            data.setdefault("budget_period", "month")
        return data


class BudgetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget_usd: Decimal = Field(ge=0, lt=MAX_BUDGET_USD)
    budget_period: Period = "month"
    alert_thresholds: list[Threshold] = Field(default_factory=lambda: [0.8])


def _future(value: str | None) -> datetime | None:
    if value is None:
        return None
    units = {"m": 60, "h": 3600, "d": 86400, "w": 604800}
    if len(value) < 2 or value[-1] not in units or not (value[:-1].isascii() and value[:-1].isdigit()):
        raise GatewayError(400, "expires_in must look like 30m, 12h, 30d or 2w", param="expires_in")
    try:
        return datetime.now(UTC) + timedelta(seconds=int(value[:-1]) * units[value[-1]])
    except OverflowError:
        raise GatewayError(400, "expires_in is too far in the future", param="expires_in") from None


class KeyStore:
    def __init__(self, engine: AsyncEngine, secret: bytes, request_engine: AsyncEngine | None = None) -> None:
        self.engine = engine
        """For loading and administration."""
        self.request_engine = request_engine or engine
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
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(virtual_keys))).mappings().all()
            blocks = await self._current_blocks(conn)
        records = [KeyRecord.from_row(r) for r in rows]
        self.by_hash = {r.key_hash: r for r in records}
        self.by_id = {r.key_id: r for r in records}
        self.blocked = blocks
        self.loaded_at = time.time()

    async def _current_blocks(self, conn: Any) -> dict[str, tuple[float, str]]:
        """Scopes whose spend in their budget's current period has reached the budget."""
        now = datetime.now(UTC)
        limits: list[tuple[str, str, str, Decimal]] = []
        for row in (await conn.execute(select(virtual_keys.c.key_id, virtual_keys.c.budget_usd,
                                              virtual_keys.c.budget_period)
                                       .where(virtual_keys.c.budget_usd.is_not(None)))).all():
            limits.append(("key", row.key_id, row.budget_period or "month", row.budget_usd))
        for row in (await conn.execute(select(budgets))).mappings().all():
            limits.append((row["scope"], row["scope_id"], row["budget_period"], row["budget_usd"]))
        out: dict[str, tuple[float, str]] = {}
        for scope, scope_id, period, amount in limits:
            total = (await conn.execute(select(spend_totals.c.cost_usd).where(and_(
                spend_totals.c.scope == scope, spend_totals.c.scope_id == scope_id,
                spend_totals.c.period == period, spend_totals.c.period_start == period_start(period, now))))).scalar()
            if total is not None and Decimal(total) >= Decimal(amount):
                out[f"{scope}:{scope_id}"] = (period_end(period, now).timestamp(), f"{period} budget of ${amount}")
        return out

    async def reload(self, key_id: str) -> None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(virtual_keys).where(virtual_keys.c.key_id == key_id))).mappings().first()
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

    async def _lookup(self, key_hash: str) -> Any:
        """The key's row, or None; a 503 (never a 401) when PostgreSQL cannot tell."""
        if not self.outage.may_try():
            raise keys_unavailable()
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S), self.request_engine.connect() as conn:
                row = (await conn.execute(select(virtual_keys).where(virtual_keys.c.key_hash == key_hash))
                       ).mappings().first()
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
        async with self.engine.begin() as conn:
            await conn.execute(virtual_keys.insert().values(**values))
        await self.reload(key_id)
        return self.by_id[key_id], token

    async def update(self, key_id: str, changes: dict[str, Any]) -> KeyRecord:
        """Change a key that is not revoked: a revoked key is final (409 `key_revoked`, nothing changed), so an
        edit racing a revocation cannot quietly give a revoked key new limits."""
        found = None
        async with self.engine.begin() as conn:
            result = await conn.execute(update(virtual_keys)
                                        .where(virtual_keys.c.key_id == key_id, virtual_keys.c.revoked_at.is_(None))
                                        .values(**changes, updated_at=datetime.now(UTC)))
            if result.rowcount == 0:
                found = (await conn.execute(select(virtual_keys.c.key_id)
                                            .where(virtual_keys.c.key_id == key_id))).first()
        if result.rowcount == 0:
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
        from sqlalchemy.dialects.postgresql import insert

        if scope not in ("team", "project"):
            raise GatewayError(400, "scope must be team or project", param="scope")
        if period not in PERIODS:
            raise GatewayError(400, f"period must be one of {', '.join(PERIODS)}", param="period")
        stmt = insert(budgets).values(scope=scope, scope_id=scope_id, budget_usd=amount, budget_period=period,
                                      alert_thresholds=thresholds)
        async with self.engine.begin() as conn:
            await conn.execute(stmt.on_conflict_do_update(
                index_elements=["scope", "scope_id"],
                set_={"budget_usd": amount, "budget_period": period, "alert_thresholds": thresholds}))
