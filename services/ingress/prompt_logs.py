"""`GET /v1/logs` and `GET /v1/logs/{request_id}`: the prompt log, for the master key only.

Each entry shows the redacted request and answer, the route, the attempts, the timings, the tokens, the
guardrail decisions and the cost (the sum of the request's usage rows, priced by accounting).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from sqlalchemy import func, select

from switchyard.services.ingress.admin import needs_database
from switchyard.shared.db import usage
from switchyard.shared.errors import GatewayError
from switchyard.shared.prompt_log import prompt_log
from switchyard.shared.spend import parse_since

if TYPE_CHECKING:
    from switchyard.services.ingress.app import Gateway

MAX_LIMIT = 1000
Since = Annotated[str | None, Query(description="30m, 24h, 7d, 2w, or an ISO date/time (UTC when no zone is given)")]

_COST = (select(func.coalesce(func.sum(usage.c.cost_usd), 0)).where(usage.c.request_id == prompt_log.c.request_id)
         .scalar_subquery().label("cost_usd"))


def _entry(row: Any) -> dict[str, Any]:
    out = {str(k): v for k, v in row._mapping.items()}
    out["ts"] = out["ts"].astimezone(UTC).isoformat()
    out["cost_usd"] = float(out["cost_usd"] or 0)
    out["tokens"] = out.pop("usage")
    return out


def _json(data: Any) -> Response:
    """JSONB values may hold keys a provider sent as numbers: written as strings, never a 500."""
    return Response(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), media_type="application/json")


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_since(value)
    except (ValueError, OverflowError):
        raise GatewayError(400, "'since' must look like 30m, 24h, 7d or an ISO date/time.", param="since") from None


def add_log_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.get("/v1/logs")
    @needs_database
    async def list_logs(request: Request, key_id: str | None = None, model: str | None = None,
                        since: Since = None, limit: int = Query(100, ge=1, le=MAX_LIMIT)) -> Response:
        await gateway.authenticate_admin(request)
        query = select(prompt_log, _COST).order_by(prompt_log.c.ts.desc()).limit(limit)
        if key_id is not None:
            query = query.where(prompt_log.c.key_id == key_id)
        if model is not None:
            query = query.where(prompt_log.c.model == model)
        start = _since(since)
        if start is not None:
            query = query.where(prompt_log.c.ts >= start)
        async with gateway.engine().connect() as conn:
            rows = (await conn.execute(query)).all()
        return _json({"object": "list", "data": [_entry(r) for r in rows]})

    @app.get("/v1/logs/{request_id}")
    @needs_database
    async def get_log(request: Request, request_id: str) -> Response:
        await gateway.authenticate_admin(request)
        async with gateway.engine().connect() as conn:
            row = (await conn.execute(select(prompt_log, _COST).where(prompt_log.c.request_id == request_id))).first()
        if row is None:
            raise GatewayError(404, "No prompt-log entry for this request id.", param="request_id",
                               code="log_not_found")
        return _json(_entry(row))
