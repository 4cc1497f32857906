"""A virtual key as stored and as an admin writes it: the record every replica caches, and the specs the admin
API accepts for keys and budgets (validated so that what is accepted fits its PostgreSQL column)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from switchyard.services.ingress.auth import Identity
from switchyard.shared.errors import GatewayError
from switchyard.shared.periods import Period


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

