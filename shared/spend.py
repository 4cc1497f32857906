"""Spend queries over the usage table, shared by `switchyard spend` and `GET /v1/spend`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from switchyard.shared.contracts import IN_DOUBT
from switchyard.shared.groupings import GROUPINGS
from switchyard.shared.pg import Database, Query

_SINCE = re.compile(r"^(\d+)([mhdw])$")


def parse_since(value: str) -> datetime:
    """`30m`, `24h`, `7d`, `2w`, or an ISO date/time (UTC when no zone is given)."""
    m = _SINCE.match(value.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        delta = {"m": timedelta(minutes=n), "h": timedelta(hours=n), "d": timedelta(days=n), "w": timedelta(weeks=n)}
        return datetime.now(UTC) - delta[unit]
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"since must look like 30m, 24h, 7d, 2w or an ISO date, not {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


_GROUP_COLUMNS = {
    "key": "key_id",
    "model": "model_group",
    "provider": "provider",
    "deployment": "deployment",
    "team": "team",
    "project": "project",
    "day": "to_char(date_trunc('day', ts), 'YYYY-MM-DD')",
}
"""What each grouping (`by`) reads from the usage table: the only text a caller's choice puts into the SQL."""

_SPEND_SQL = """
SELECT {column} AS "group",
       count(*) AS requests,
       coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(completion_tokens), 0) AS completion_tokens,
       coalesce(sum(cached_tokens), 0) AS cached_tokens,
       coalesce(sum(cost_usd), 0) AS cost_usd,
       count(*) FILTER (WHERE ok IS false AND status <> {in_doubt}) AS errors,
       count(*) FILTER (WHERE status = {in_doubt}) AS in_doubt,
       count(*) FILTER (WHERE cache_hit IS true) AS cache_hits,
       coalesce(sum(cost_saved_usd), 0) AS saved_usd
FROM usage
WHERE ts >= :since{until}
GROUP BY 1
ORDER BY sum(cost_usd) DESC, 1
"""


def _query(by: str, until: bool) -> Query:
    """The spend statement grouped by `by` (a GROUPINGS name), bounded by `:until` when `until`."""
    column = _GROUP_COLUMNS.get(by)
    if column is None:
        raise ValueError(f"by must be one of {', '.join(GROUPINGS)}, not {by!r}")
    return Query(_SPEND_SQL.format(column=column, in_doubt=int(IN_DOUBT), until=" AND ts < :until" if until else ""))


async def spend(database: Database, by: str = "model", since: str = "30d",
                until: str | None = None) -> list[dict[str, Any]]:
    """Requests, tokens and USD per group since a point in time (and before `until`), most expensive first;
    `cache_hits` counts the requests the response cache answered (cost 0, no tokens) and `saved_usd` what
    their provider calls cost."""
    query = _query(by, bool(until))
    params: dict[str, Any] = {"since": parse_since(since)}
    if until:
        params["until"] = parse_since(until)
    rows = await database.fetch(query, params)
    out = []
    for row in rows:
        item: dict[str, Any] = dict(row)
        item[by] = item.pop("group")
        item["cost_usd"] = float(Decimal(item["cost_usd"]))
        item["saved_usd"] = float(Decimal(item["saved_usd"]))
        for k in ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "errors", "in_doubt",
                  "cache_hits"):
            item[k] = int(item[k])
        out.append(item)
    return out
