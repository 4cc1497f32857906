"""The dashboard's SQL over the accounting database: overview figures, time series, deployment health,
recent failovers and requests. Read-only; every query is bounded (a time window and/or a LIMIT).

Latency percentiles are computed in one place, `latency_columns`, from `usage.latency_ms` (total time of
a successful attempt) with PostgreSQL's `percentile_cont`: when usage rows gain richer timings (time to
first token), only that function changes.

A "request" is a request id (its attempts are usage rows); it succeeded when one of its attempts did.
Attempts still in doubt (a worker died mid-call, IN_DOUBT) count neither as successes nor as errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from switchyard.shared.contracts import IN_DOUBT
from switchyard.shared.periods import period_start
from switchyard.shared.pg import Database, Query, Record

PERCENTILES = {"p50_ms": 0.5, "p95_ms": 0.95, "p99_ms": 0.99}
WINDOWS = {"1h": (timedelta(hours=1), 60), "24h": (timedelta(days=1), 3600)}
"""Overview windows: span and chart bucket size in seconds."""
MAX_ROWS = 500


def latency_columns() -> str:
    """P50/P95/P99 of successful attempts' total latency, in ms (NULL when there were none)."""
    return ",\n".join(f"percentile_cont({q}) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE ok IS true) AS {name}"
                       for name, q in PERCENTILES.items())


_REQUEST_COLUMNS = f"""
count(DISTINCT request_id) AS requests,
count(DISTINCT request_id) FILTER (WHERE ok IS true) AS succeeded,
count(*) FILTER (WHERE ok IS false AND status <> {int(IN_DOUBT)}) AS failed_attempts,
coalesce(sum(cost_usd), 0) AS cost_usd,
{latency_columns()}
"""
"""A request's figures over a set of usage rows: requests, those that succeeded, failed attempts (not those
in doubt), cost and latency percentiles."""


def _bucket(seconds: int) -> str:
    """The start (epoch seconds) of the `seconds`-long bucket a usage row's `ts` falls in."""
    return f"floor(extract(epoch FROM ts) / {int(seconds)}) * {int(seconds)} AS bucket"


_TOTALS = Query(f"SELECT {_REQUEST_COLUMNS} FROM usage WHERE ts >= :since")
_SERIES = {step: Query(f"SELECT {_bucket(step)}, {_REQUEST_COLUMNS} FROM usage WHERE ts >= :since "
                       "GROUP BY 1 ORDER BY 1")
           for _, step in WINDOWS.values()}
_SPENT = Query("SELECT coalesce(sum(cost_usd), 0) FROM usage WHERE ts >= :since")
_DAILY_SPEND = Query(f"SELECT {_bucket(86400)}, coalesce(sum(cost_usd), 0) AS c FROM usage WHERE ts >= :since "
                     "GROUP BY 1 ORDER BY 1")
_DEPLOYMENTS = Query(f"""
SELECT deployment, max(provider) AS provider, max(model_group) AS model_group, {_REQUEST_COLUMNS}
FROM usage WHERE ts >= :since GROUP BY deployment
""")
_FAILOVERS = Query("""
SELECT u.request_id, u.ts, u.model_group, u.attempt, u.deployment AS to_deployment, u.ok,
       b.deployment AS from_deployment, b.status AS from_status
FROM usage u LEFT OUTER JOIN usage b ON b.request_id = u.request_id AND b.attempt = u.attempt - 1
WHERE u.attempt > 0 AND u.ts >= :since
ORDER BY u.ts DESC LIMIT 50
""")
_REQUESTS = """
SELECT request_id, min(ts) AS ts, max(key_id) AS key_id, max(model_group) AS model, count(*) AS attempts,
       bool_or(ok) AS ok, coalesce(max(status) FILTER (WHERE ok IS true), max(status)) AS status,
       sum(latency_ms) AS latency_ms, coalesce(sum(cost_usd), 0) AS cost_usd
FROM usage WHERE ts >= :since{where}
GROUP BY request_id{having}
ORDER BY ts DESC LIMIT :limit
"""
_REQUEST_FILTERS = (("key", " AND key_id = :key"), ("model", " AND model_group = :model"))
"""The optional filters of `requests`: a parameter and its condition (fixed text, the values are parameters)."""
_REQUEST_STATUS = {None: "", "ok": " HAVING bool_or(ok)", "error": " HAVING NOT bool_or(ok)"}
_REQUEST_DETAIL = Query(f"""
SELECT attempt, call_seq, ts, kind, provider, deployment, model_group, provider_model, key_id, team, project,
       status, ok, stream, latency_ms, prompt_tokens, completion_tokens, cached_tokens, cost_usd, priced
FROM usage WHERE request_id = :request_id ORDER BY attempt, call_seq LIMIT {MAX_ROWS}
""")
_BUDGETED_KEYS = Query("SELECT key_id, budget_period FROM virtual_keys "
                       "WHERE budget_usd IS NOT NULL AND revoked_at IS NULL")
_KEY_SPENT = Query("SELECT coalesce(sum(cost_usd), 0) FROM usage WHERE key_id = :key_id AND ts >= :since")

_EMPTY: dict[str, Any] = dict.fromkeys(("requests", "succeeded", "failed_attempts", "cost_usd", *PERCENTILES))
"""The figures of a deployment without usage rows."""


def _figures(row: Record | Mapping[str, Any]) -> dict[str, Any]:
    requests, succeeded = int(row["requests"] or 0), int(row["succeeded"] or 0)
    errors = requests - succeeded
    out: dict[str, Any] = {"requests": requests, "errors": errors,
                           "error_rate": round(errors / requests, 4) if requests else 0.0,
                           "failed_attempts": int(row["failed_attempts"] or 0),
                           "cost_usd": float(Decimal(row["cost_usd"] or 0))}
    for name in PERCENTILES:
        value = row[name]
        out[name] = round(float(value), 1) if value is not None else None
    return out


async def overview(database: Database, now: datetime | None = None) -> dict[str, Any]:
    """Per window (last hour, last day): the figures and a series of them per bucket; spend today, this
    week and this month (UTC calendar periods), with a daily spend series over the month."""
    now = now or datetime.now(UTC)
    out: dict[str, Any] = {"generated_at": now.isoformat(), "windows": {}, "cache": None}
    async with database.connection() as conn:
        for name, (span, step) in WINDOWS.items():
            window = {"since": now - span}
            total = await conn.fetchrow(_TOTALS, window)
            assert total is not None  # an aggregate without GROUP BY: always one row
            rows = await conn.fetch(_SERIES[step], window)
            out["windows"][name] = {**_figures(total), "bucket_s": step,
                                    "series": [{"t": int(r["bucket"]), **_figures(r)} for r in rows]}
        spend: dict[str, float] = {}
        for label, period in (("today", "day"), ("week", "week"), ("month", "month")):
            value = await conn.fetchval(_SPENT, {"since": period_start(period, now)})
            spend[label] = float(Decimal(value or 0))
        days = await conn.fetch(_DAILY_SPEND, {"since": period_start("month", now)})
    out["spend"] = {**spend, "series": [{"t": int(r["bucket"]), "cost_usd": float(Decimal(r["c"]))} for r in days]}
    return out


async def deployments(database: Database, configured: list[dict[str, str]],
                      now: datetime | None = None) -> list[dict[str, Any]]:
    """Each configured deployment (plus any seen in the last hour) with its figures over the last hour.
    Breaker states and backlogs are not in PostgreSQL: the caller adds them (services/ingress/ui/providers.py)."""
    now = now or datetime.now(UTC)
    stats = {r["deployment"]: r for r in await database.fetch(_DEPLOYMENTS, {"since": now - timedelta(hours=1)})}
    known = {c["deployment"] for c in configured}
    extra = [{"deployment": d, "provider": r["provider"], "model_group": r["model_group"]}
             for d, r in stats.items() if d not in known]
    return [{**dep, **_figures(stats.get(dep["deployment"]) or _EMPTY)} for dep in configured + extra]


async def failovers(database: Database, since: timedelta = timedelta(days=1)) -> list[dict[str, Any]]:
    """Recent attempts after the first (attempt > 0): which deployment failed and which one took over."""
    rows = await database.fetch(_FAILOVERS, {"since": datetime.now(UTC) - since})
    return [{**dict(r), "ts": r["ts"].isoformat()} for r in rows]


async def requests(database: Database, *, since: datetime, key: str | None, model: str | None,
                   status: str | None, limit: int) -> list[dict[str, Any]]:
    """Recent requests, newest first, one row each: attempts, final status, total latency and cost."""
    params: dict[str, Any] = {"since": since, "limit": min(limit, MAX_ROWS)}
    filters = {"key": key, "model": model}
    where = ""
    for name, condition in _REQUEST_FILTERS:
        if filters[name]:
            where += condition
            params[name] = filters[name]
    query = Query(_REQUESTS.format(where=where, having=_REQUEST_STATUS.get(status, "")))
    rows = await database.fetch(query, params)
    return [{**dict(r), "ts": r["ts"].isoformat(), "cost_usd": float(Decimal(r["cost_usd"])),
             "latency_ms": round(float(r["latency_ms"] or 0), 1)} for r in rows]


async def request_detail(database: Database, request_id: str) -> list[dict[str, Any]]:
    """Every attempt of one request, in order: route, outcome, timing, tokens and cost."""
    rows = await database.fetch(_REQUEST_DETAIL, {"request_id": request_id})
    return [{**dict(r), "ts": r["ts"].isoformat(), "cost_usd": float(Decimal(r["cost_usd"]))} for r in rows]


async def key_budget_use(database: Database, now: datetime | None = None) -> dict[str, float]:
    """Each budgeted key's spend in its budget's current period (from the usage rows), by key id."""
    now = now or datetime.now(UTC)
    out: dict[str, float] = {}
    async with database.connection() as conn:
        for key_id, period in await conn.fetch(_BUDGETED_KEYS):
            value = await conn.fetchval(_KEY_SPENT, {"key_id": key_id,
                                                     "since": period_start(period or "month", now)})
            out[key_id] = float(Decimal(value or 0))
    return out
