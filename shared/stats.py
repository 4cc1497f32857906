"""Latency percentiles per deployment, model or provider, from the accounting database (every replica's calls).

Shared by `GET /v1/stats/latency` and `switchyard stats`. One row per provider call (the usage table):
- `requests` counts calls with an outcome in the window (calls still "in doubt" are left out), `errors`
  those that failed, `error_rate` = errors / requests;
- P50/P95/P99 of `total_ms` (ingress accepting the request to the end of the call: queues, earlier
  attempts, the call), `latency_ms` (the provider call itself) and `ttft_ms` (streams: the call's start to
  its first chunk) are over successful calls only: a fast error is not a fast answer.
"""

from __future__ import annotations

from typing import Any

from switchyard.shared.groupings import LATENCY_GROUPINGS, WINDOWS
from switchyard.shared.pg import Database, Query

TIMINGS = ("total_ms", "provider_ms", "ttft_ms")

LATENCY_SQL = """
SELECT {column} AS "group",
       count(*) AS requests,
       count(*) FILTER (WHERE NOT ok) AS errors,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY total_ms) FILTER (WHERE ok) AS total_ms,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE ok) AS provider_ms,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ttft_ms) FILTER (WHERE ok) AS ttft_ms
FROM usage
WHERE ts >= now() - CAST(:window AS interval) AND status <> 0
GROUP BY 1
ORDER BY 1
"""
"""The query (README.md shows it): `{column}` is deployment, model_group or provider; status 0 is "in doubt";
`:window` is one of WINDOWS (a timedelta, which asyncpg sends as an interval)."""

_QUERIES = {by: Query(LATENCY_SQL.format(column=column)) for by, column in LATENCY_GROUPINGS.items()}


def _percentiles(values: list[float] | None) -> dict[str, float | None]:
    p50, p95, p99 = values if values else (None, None, None)
    return {"p50": p50, "p95": p95, "p99": p99}


async def latency(database: Database, by: str = "deployment", window: str = "1h") -> list[dict[str, Any]]:
    """Counts, error rate and P50/P95/P99 (milliseconds) of each timing per group over the window."""
    if by not in LATENCY_GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(LATENCY_GROUPINGS)}, not {by!r}")
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {', '.join(WINDOWS)}, not {window!r}")
    out = []
    for row in await database.fetch(_QUERIES[by], {"window": WINDOWS[window]}):
        requests, errors = int(row["requests"]), int(row["errors"])
        item: dict[str, Any] = {by: row["group"], "requests": requests, "errors": errors,
                                "error_rate": errors / requests if requests else 0.0}
        for timing in TIMINGS:
            item[timing] = _percentiles(row[timing])
        out.append(item)
    return out
