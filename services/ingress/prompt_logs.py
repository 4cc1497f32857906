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

from switchyard.services.ingress.admin import needs_database
from switchyard.shared import pg
from switchyard.shared.errors import GatewayError
from switchyard.shared.spend import parse_since

if TYPE_CHECKING:
    from switchyard.services.ingress.app import Gateway

MAX_LIMIT = 1000
Since = Annotated[str | None, Query(description="30m, 24h, 7d, 2w, or an ISO date/time (UTC when no zone is given)")]

_ENTRY = """
SELECT p.request_id, p.ts, p.key_id, p.model, p.kind, p.stream, p.status, p.route, p.attempts, p.request, p.answer,
       p.error, p.timings, p.usage, p.guardrails,
       (SELECT coalesce(sum(u.cost_usd), 0) FROM usage u WHERE u.request_id = p.request_id) AS cost_usd
FROM prompt_log p
"""
"""Every column of the prompt log (shared/db.py's `prompt_log`) and the request's cost from its usage rows."""

_GET = pg.Query(_ENTRY + "WHERE p.request_id = :request_id")

_FILTERS = (("key_id", "p.key_id = :key_id"), ("model", "p.model = :model"), ("since", "p.ts >= :since"))
"""The optional filters of `GET /v1/logs`: a parameter and its condition (fixed text, values are parameters)."""


def _list_query(given: set[str]) -> pg.Query:
    """The list statement with the conditions of the filters in `given`, newest first."""
    conditions = [condition for name, condition in _FILTERS if name in given]
    where = f"WHERE {' AND '.join(conditions)} " if conditions else ""
    return pg.Query(f"{_ENTRY}{where}ORDER BY p.ts DESC LIMIT :limit")


def _entry(row: pg.Record) -> dict[str, Any]:
    out = dict(row)
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
        filters: dict[str, Any] = {"key_id": key_id, "model": model, "since": _since(since)}
        params = {name: value for name, value in filters.items() if value is not None}
        rows = await gateway.database().fetch(_list_query(set(params)), {**params, "limit": limit})
        return _json({"object": "list", "data": [_entry(r) for r in rows]})

    @app.get("/v1/logs/{request_id}")
    @needs_database
    async def get_log(request: Request, request_id: str) -> Response:
        await gateway.authenticate_admin(request)
        row = await gateway.database().fetchrow(_GET, {"request_id": request_id})
        if row is None:
            raise GatewayError(404, "No prompt-log entry for this request id.", param="request_id",
                               code="log_not_found")
        return _json(_entry(row))
