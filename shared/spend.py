"""Spend queries over the usage table, shared by `switchyard spend` and `GET /v1/spend`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, true
from sqlalchemy.ext.asyncio import AsyncEngine

from switchyard.shared.contracts import IN_DOUBT
from switchyard.shared.db import usage
from switchyard.shared.groupings import GROUPINGS

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


def _column(by: str) -> Any:
    if by == "key":
        return usage.c.key_id
    if by == "model":
        return usage.c.model_group
    if by == "provider":
        return usage.c.provider
    if by == "deployment":
        return usage.c.deployment
    if by == "team":
        return usage.c.team
    if by == "project":
        return usage.c.project
    if by == "day":
        return func.to_char(func.date_trunc("day", usage.c.ts), "YYYY-MM-DD")
    raise ValueError(f"by must be one of {', '.join(GROUPINGS)}, not {by!r}")


async def spend(engine: AsyncEngine, by: str = "model", since: str = "30d",
                until: str | None = None) -> list[dict[str, Any]]:
    """Requests, tokens and USD per group since a point in time (and before `until`), most expensive first;
    `cache_hits` counts the requests the response cache answered (cost 0, no tokens) and `saved_usd` what
    their provider calls cost."""
    col = _column(by).label("group")
    query = (
        select(
            col,
            func.count().label("requests"),
            func.coalesce(func.sum(usage.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(usage.c.cached_tokens), 0).label("cached_tokens"),
            func.coalesce(func.sum(usage.c.cost_usd), 0).label("cost_usd"),
            func.count().filter(usage.c.ok.is_(False), usage.c.status != IN_DOUBT).label("errors"),
            func.count().filter(usage.c.status == IN_DOUBT).label("in_doubt"),
            func.count().filter(usage.c.cache_hit.is_(True)).label("cache_hits"),
            func.coalesce(func.sum(usage.c.cost_saved_usd), 0).label("saved_usd"),
        )
        .where(usage.c.ts >= parse_since(since))
        .where(usage.c.ts < parse_since(until) if until else true())
        .group_by(col)
        .order_by(func.sum(usage.c.cost_usd).desc(), col)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    out = []
    for row in rows:
        item = dict(row)
        item[by] = item.pop("group")
        item["cost_usd"] = float(Decimal(item["cost_usd"]))
        item["saved_usd"] = float(Decimal(item["saved_usd"]))
        for k in ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "errors", "in_doubt",
                  "cache_hits"):
            item[k] = int(item[k])
        out.append(item)
    return out
