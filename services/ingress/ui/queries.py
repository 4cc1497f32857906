"""The dashboard's SQL over the accounting database: overview figures, time series, deployment health,
recent failovers and requests. Read-only; every query is bounded (a time window and/or a LIMIT).

Latency percentiles are computed in one place, `latency_columns`, from `usage.latency_ms` (total time of
a successful attempt) with PostgreSQL's `percentile_cont`: when usage rows gain richer timings (time to
first token), only that function changes.

A "request" is a request id (its attempts are usage rows); it succeeded when one of its attempts did.
Attempts still in doubt (a worker died mid-call, IN_DOUBT) count neither as successes nor as errors.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncEngine

from switchyard.shared.contracts import IN_DOUBT
from switchyard.shared.db import usage, virtual_keys
from switchyard.shared.periods import period_start

PERCENTILES = {"p50_ms": 0.5, "p95_ms": 0.95, "p99_ms": 0.99}
WINDOWS = {"1h": (timedelta(hours=1), 60), "24h": (timedelta(days=1), 3600)}
"""Overview windows: span and chart bucket size in seconds."""
MAX_ROWS = 500


def latency_columns() -> list[Any]:
    """P50/P95/P99 of successful attempts' total latency, in ms (NULL when there were none)."""
    ok = usage.c.ok.is_(True)
    return [func.percentile_cont(q).within_group(usage.c.latency_ms).filter(ok).label(name)
            for name, q in PERCENTILES.items()]


def _finished() -> Any:
    return usage.c.status != IN_DOUBT


def _request_columns() -> list[Any]:
    return [
        func.count(usage.c.request_id.distinct()).label("requests"),
        func.count(usage.c.request_id.distinct()).filter(usage.c.ok.is_(True)).label("succeeded"),
        func.count().filter(usage.c.ok.is_(False), _finished()).label("failed_attempts"),
        func.coalesce(func.sum(usage.c.cost_usd), 0).label("cost_usd"),
        *latency_columns(),
    ]


def _figures(row: Any) -> dict[str, Any]:
    requests, succeeded = int(row.requests or 0), int(row.succeeded or 0)
    errors = requests - succeeded
    out: dict[str, Any] = {"requests": requests, "errors": errors,
                           "error_rate": round(errors / requests, 4) if requests else 0.0,
                           "failed_attempts": int(row.failed_attempts or 0),
                           "cost_usd": float(Decimal(row.cost_usd or 0))}
    for name in PERCENTILES:
        value = getattr(row, name)
        out[name] = round(float(value), 1) if value is not None else None
    return out


def _bucket(seconds: int) -> Any:
    epoch = func.extract("epoch", usage.c.ts)
    return (func.floor(epoch / seconds) * seconds).label("bucket")


async def overview(engine: AsyncEngine, now: datetime | None = None) -> dict[str, Any]:
    """Per window (last hour, last day): the figures and a series of them per bucket; spend today, this
    week and this month (UTC calendar periods), with a daily spend series over the month."""
    now = now or datetime.now(UTC)
    out: dict[str, Any] = {"generated_at": now.isoformat(), "windows": {}, "cache": None}
    async with engine.connect() as conn:
        for name, (span, step) in WINDOWS.items():
            where = usage.c.ts >= now - span
            total = (await conn.execute(select(*_request_columns()).where(where))).one()
            bucket = _bucket(step)
            rows = (await conn.execute(select(bucket, *_request_columns()).where(where)
                                       .group_by(literal_column("bucket")).order_by(literal_column("bucket")))).all()
            out["windows"][name] = {**_figures(total), "bucket_s": step,
                                    "series": [{"t": int(r.bucket), **_figures(r)} for r in rows]}
        spend: dict[str, float] = {}
        for label, period in (("today", "day"), ("week", "week"), ("month", "month")):
            value = (await conn.execute(select(func.coalesce(func.sum(usage.c.cost_usd), 0))
                                        .where(usage.c.ts >= period_start(period, now)))).scalar()
            spend[label] = float(Decimal(value or 0))
        month_start = period_start("month", now)
        days = (await conn.execute(select(_bucket(86400), func.coalesce(func.sum(usage.c.cost_usd), 0).label("c"))
                                   .where(usage.c.ts >= month_start)
                                   .group_by(literal_column("bucket")).order_by(literal_column("bucket")))).all()
    out["spend"] = {**spend, "series": [{"t": int(r.bucket), "cost_usd": float(Decimal(r.c))} for r in days]}
    return out


async def deployments(engine: AsyncEngine, configured: list[dict[str, str]],
                      now: datetime | None = None) -> list[dict[str, Any]]:
    """Each configured deployment (plus any seen in the last hour) with its figures over the last hour.
    Breaker states and backlogs are not in PostgreSQL: the caller adds them (services/ingress/ui/providers.py)."""
    now = now or datetime.now(UTC)
    async with engine.connect() as conn:
        stats = {r.deployment: r for r in (await conn.execute(
            select(usage.c.deployment, func.max(usage.c.provider).label("provider"),
                   func.max(usage.c.model_group).label("model_group"), *_request_columns())
            .where(usage.c.ts >= now - timedelta(hours=1)).group_by(usage.c.deployment))).all()}
    known = {c["deployment"] for c in configured}
    extra = [{"deployment": d, "provider": r.provider, "model_group": r.model_group}
             for d, r in stats.items() if d not in known]
    return [{**dep, **_figures(stats.get(dep["deployment"]) or _Empty())} for dep in configured + extra]


def _plain(row: Any) -> dict[str, Any]:
    """A row as a dict with plain `str` keys (SQLAlchemy's labels are a str subclass orjson refuses)."""
    return {str(k): v for k, v in row.items()}


class _Empty:
    requests = succeeded = failed_attempts = cost_usd = p50_ms = p95_ms = p99_ms = None


async def failovers(engine: AsyncEngine, since: timedelta = timedelta(days=1)) -> list[dict[str, Any]]:
    """Recent attempts after the first (attempt > 0): which deployment failed and which one took over."""
    before = usage.alias("before")
    query = (select(usage.c.request_id, usage.c.ts, usage.c.model_group, usage.c.attempt,
                    usage.c.deployment.label("to_deployment"), usage.c.ok,
                    before.c.deployment.label("from_deployment"), before.c.status.label("from_status"))
             .join(before, and_(before.c.request_id == usage.c.request_id, before.c.attempt == usage.c.attempt - 1),
                   isouter=True)
             .where(usage.c.attempt > 0, usage.c.ts >= datetime.now(UTC) - since)
             .order_by(usage.c.ts.desc()).limit(50))
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [{**_plain(r), "ts": r["ts"].isoformat()} for r in rows]


async def requests(engine: AsyncEngine, *, since: datetime, key: str | None, model: str | None,
                   status: str | None, limit: int) -> list[dict[str, Any]]:
    """Recent requests, newest first, one row each: attempts, final status, total latency and cost."""
    last_status = func.max(usage.c.status).filter(usage.c.ok.is_(True))
    query = (select(usage.c.request_id, func.min(usage.c.ts).label("ts"), func.max(usage.c.key_id).label("key_id"),
                    func.max(usage.c.model_group).label("model"), func.count().label("attempts"),
                    func.bool_or(usage.c.ok).label("ok"),
                    func.coalesce(last_status, func.max(usage.c.status)).label("status"),
                    func.sum(usage.c.latency_ms).label("latency_ms"),
                    func.coalesce(func.sum(usage.c.cost_usd), 0).label("cost_usd"))
             .where(usage.c.ts >= since).group_by(usage.c.request_id))
    if key:
        query = query.where(usage.c.key_id == key)
    if model:
        query = query.where(usage.c.model_group == model)
    if status == "ok":
        query = query.having(func.bool_or(usage.c.ok))
    elif status == "error":
        query = query.having(~func.bool_or(usage.c.ok))
    query = query.order_by(literal_column("ts").desc()).limit(min(limit, MAX_ROWS))
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [{**_plain(r), "ts": r["ts"].isoformat(), "cost_usd": float(Decimal(r["cost_usd"])),
             "latency_ms": round(float(r["latency_ms"] or 0), 1)} for r in rows]


async def request_detail(engine: AsyncEngine, request_id: str) -> list[dict[str, Any]]:
    """Every attempt of one request, in order: route, outcome, timing, tokens and cost."""
    cols = [usage.c.attempt, usage.c.call_seq, usage.c.ts, usage.c.kind, usage.c.provider, usage.c.deployment,
            usage.c.model_group, usage.c.provider_model, usage.c.key_id, usage.c.team, usage.c.project,
            usage.c.status, usage.c.ok, usage.c.stream, usage.c.latency_ms, usage.c.prompt_tokens,
            usage.c.completion_tokens, usage.c.cached_tokens, usage.c.cost_usd, usage.c.priced]
    async with engine.connect() as conn:
        rows = (await conn.execute(select(*cols).where(usage.c.request_id == request_id)
                                   .order_by(usage.c.attempt, usage.c.call_seq).limit(MAX_ROWS))).mappings().all()
    return [{**_plain(r), "ts": r["ts"].isoformat(), "cost_usd": float(Decimal(r["cost_usd"]))} for r in rows]


async def key_budget_use(engine: AsyncEngine, now: datetime | None = None) -> dict[str, float]:
    """Each budgeted key's spend in its budget's current period (from the usage rows), by key id."""
    now = now or datetime.now(UTC)
    out: dict[str, float] = {}
    async with engine.connect() as conn:
        keys = (await conn.execute(select(virtual_keys.c.key_id, virtual_keys.c.budget_period)
                                   .where(virtual_keys.c.budget_usd.is_not(None),
                                          virtual_keys.c.revoked_at.is_(None)))).all()
        for key_id, period in keys:
            value = (await conn.execute(select(func.coalesce(func.sum(usage.c.cost_usd), 0)).where(
                usage.c.key_id == key_id, usage.c.ts >= period_start(period or "month", now)))).scalar()
            out[key_id] = float(Decimal(value or 0))
    return out
