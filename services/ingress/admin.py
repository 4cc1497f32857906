"""The admin API on ingress (master key only): virtual keys, team/project budgets, spend.

Every call here needs PostgreSQL; while it is unreachable they answer 503 `database_unavailable`
with Retry-After (OpenAI-style body), never a 500.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import Response

from switchyard.services.ingress.database import database_errors_as_503
from switchyard.services.ingress.guarding import check_key_guardrails
from switchyard.services.ingress.keys import BudgetSpec, KeySpec
from switchyard.services.ingress.openapi import json_body
from switchyard.services.ingress.responses import json_response
from switchyard.services.ingress.validation import read_json, validate
from switchyard.shared.contracts import KeyEvent
from switchyard.shared.errors import GatewayError
from switchyard.shared.groupings import GROUPINGS, LATENCY_GROUPINGS, WINDOWS

# Documented values of the admin routes' parameters (the document only: the routes check them with clearer 400s).
Scope = Annotated[str, Path(json_schema_extra={"enum": ["team", "project"]})]
By = Annotated[str, Query(json_schema_extra={"enum": list(GROUPINGS)})]
LatencyBy = Annotated[str, Query(json_schema_extra={"enum": list(LATENCY_GROUPINGS)})]
Window = Annotated[str, Query(json_schema_extra={"enum": list(WINDOWS)})]
Since = Annotated[str, Query(description="30m, 24h, 7d, 2w, or an ISO date/time (UTC when no zone is given)",
                             json_schema_extra={"pattern": r"^(\d+[mhdw]|\d{4}-\d{2}-\d{2}.*)$"})]

if TYPE_CHECKING:
    from switchyard.services.ingress.app import Gateway


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Response]])


def needs_database(handler: Handler) -> Handler:
    """A failed or timed-out PostgreSQL call in `handler` answers 503 + Retry-After instead of a 500."""
    @functools.wraps(handler)
    async def wrapped(*args: Any, **kwargs: Any) -> Response:
        with database_errors_as_503("The admin API"):
            return await handler(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def add_admin_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.post("/v1/keys", openapi_extra=json_body(KeySpec))
    @needs_database
    async def create_key(request: Request) -> Response:
        await gateway.authenticate_admin(request)
        spec = validate(KeySpec, await read_json(request))
        assert isinstance(spec, KeySpec)
        check_key_guardrails(gateway.guardrails, spec.guardrails)
        record, token = await gateway.key_store().create(spec.columns())
        await gateway.publish_key_event(KeyEvent(key_id=record.key_id, action="created"))
        return json_response({**record.public(), "key": token}, 201)

    @app.get("/v1/keys")
    @needs_database
    async def list_keys(request: Request) -> Response:
        await gateway.authenticate_admin(request)
        return json_response({"object": "list", "data": [r.public() for r in await gateway.key_store().all_keys()]})

    @app.get("/v1/keys/{key_id}")
    @needs_database
    async def get_key(request: Request, key_id: str) -> Response:
        await gateway.authenticate_admin(request)
        await gateway.key_store().reload(key_id)
        record = gateway.key_store().by_id.get(key_id)
        if record is None:
            raise GatewayError(404, f"No key {key_id!r}.", param="key_id", code="key_not_found")
        return json_response(record.public())

    @app.patch("/v1/keys/{key_id}", openapi_extra=json_body(KeySpec))
    @needs_database
    async def update_key(request: Request, key_id: str) -> Response:
        await gateway.authenticate_admin(request)
        spec = validate(KeySpec, await read_json(request))
        assert isinstance(spec, KeySpec)
        check_key_guardrails(gateway.guardrails, spec.guardrails)
        record = await gateway.key_store().update(key_id, spec.columns())
        await gateway.publish_key_event(KeyEvent(key_id=key_id, action="updated"))
        return json_response(record.public())

    @app.post("/v1/keys/{key_id}/revoke")
    @app.delete("/v1/keys/{key_id}")
    @needs_database
    async def revoke_key(request: Request, key_id: str) -> Response:
        await gateway.authenticate_admin(request)
        record = await gateway.key_store().revoke(key_id)
        await gateway.publish_key_event(KeyEvent(key_id=key_id, action="revoked"))
        return json_response(record.public())

    @app.put("/v1/budgets/{scope}/{scope_id}", openapi_extra=json_body(BudgetSpec))
    @needs_database
    async def set_budget(request: Request, scope: Scope, scope_id: str) -> Response:
        await gateway.authenticate_admin(request)
        spec = validate(BudgetSpec, await read_json(request))
        assert isinstance(spec, BudgetSpec)
        await gateway.key_store().set_budget(scope, scope_id, spec.budget_usd, spec.budget_period,
                                             spec.alert_thresholds)
        return json_response({"scope": scope, "scope_id": scope_id, **spec.model_dump(mode="json")})

    @app.get("/v1/spend")
    @needs_database
    async def spend_api(request: Request, by: By = "model", since: Since = "30d") -> Response:
        await gateway.authenticate_admin(request)
        from switchyard.shared.spend import spend

        try:
            rows = await spend(gateway.database(), by=by, since=since)
        except OverflowError:
            raise GatewayError(400, "'since' is too far in the past.", param="since") from None
        except ValueError as e:
            raise GatewayError(400, str(e), param="by" if "by" in str(e).split()[0] else "since") from None
        return json_response({"object": "list", "by": by, "since": since, "data": rows})

    @app.get("/v1/stats/latency")
    @needs_database
    async def latency_stats(request: Request, by: LatencyBy = "deployment", window: Window = "1h") -> Response:
        """P50/P95/P99 of total, provider and first-token time with counts and error rates (shared/stats.py)."""
        await gateway.authenticate_admin(request)
        from switchyard.shared.stats import latency

        if by not in LATENCY_GROUPINGS:
            raise GatewayError(400, f"'by' must be one of {', '.join(LATENCY_GROUPINGS)}.", param="by")
        if window not in WINDOWS:
            raise GatewayError(400, f"'window' must be one of {', '.join(WINDOWS)}.", param="window")
        rows = await latency(gateway.database(), by=by, window=window)
        return json_response({"object": "list", "by": by, "window": window, "unit": "ms", "data": rows})
