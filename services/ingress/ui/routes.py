"""The dashboard's HTTP surface on ingress.

- `GET /ui`: the page (static HTML, CSS and ES modules from `services/ingress/ui/static/`, no build step),
  with a Content-Security-Policy that allows only this origin's own scripts and styles.
- `POST /ui/login` (`{"master_key": "..."}`, JSON or a form) sets the session cookie; `POST /ui/logout` ends it.
- `GET /v1/dashboard/...`: the page's data as JSON, for the master key (the session cookie or
  `Authorization: Bearer <master key>`), so scripts can use them without the page. Key and batch changes go
  through the existing admin and Batches APIs (`/v1/keys`, `/v1/batches`), the same ones `switchyard keys` uses.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from switchyard.services.ingress.admin import By, Since, needs_database
from switchyard.services.ingress.auth import is_master
from switchyard.services.ingress.responses import json_response
from switchyard.services.ingress.ui import queries
from switchyard.services.ingress.ui.providers import ProviderWatch
from switchyard.services.ingress.ui.session import (
    SESSION_COOKIE,
    SESSION_TTL_S,
    refuse_cross_site,
    sessions_for,
)
from switchyard.shared import topics, ui_assets
from switchyard.shared.errors import GatewayError
from switchyard.shared.groupings import GROUPINGS
from switchyard.shared.spend import parse_since, spend

if TYPE_CHECKING:
    from switchyard.services.ingress.app import Gateway

STATIC = Path(__file__).parent / "static"
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
CSV_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd", "errors", "in_doubt")
MAX_LOGIN_BODY = 4096
STATES_UNKNOWN = "The breaker states are unknown: this ingress cannot read llm.events from the broker right now."
VENDOR_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def _since(value: str, param: str = "since") -> datetime:
    try:
        return parse_since(value)
    except (ValueError, OverflowError) as e:
        raise GatewayError(400, str(e) if isinstance(e, ValueError) else f"'{param}' is out of range.",
                           param=param, code="invalid_value") from None


def _cookie(value: str, max_age: int, secure: bool) -> str:
    return (f"{SESSION_COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict"
            + ("; Secure" if secure else ""))


async def _login_key(request: Request) -> str:
    raw = await request.body()
    if len(raw) > MAX_LOGIN_BODY:
        raise GatewayError(413, "The sign-in body is too large.", code="body_too_large")
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        from urllib.parse import parse_qs

        values = parse_qs(raw.decode("utf-8", "replace")).get("master_key") or [""]
        return values[0]
    from switchyard.services.ingress.validation import read_json

    body = await read_json(request)
    key = body.get("master_key")
    if not isinstance(key, str):
        raise GatewayError(400, "Send {\"master_key\": \"...\"}.", param="master_key",
                           code="missing_required_parameter")
    return key


def add_ui_routes(app: FastAPI, gateway: Gateway) -> None:
    """Mount the page, sign-in/out and the `/v1/dashboard/` JSON endpoints on `app`."""
    page = (STATIC / "index.html").read_bytes()
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")

    @app.get("/ui", include_in_schema=False)
    @app.get("/ui/", include_in_schema=False)
    async def ui_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"content-security-policy": PAGE_CSP, "x-frame-options": "DENY",
                                 "referrer-policy": "no-referrer"})

    @app.get("/ui/vendor/{name}", include_in_schema=False)
    async def ui_vendor(name: str) -> Response:
        """The charting library installed by `switchyard ui install` (only its known files); 404 until then."""
        path = ui_assets.asset(name)
        if path is None:
            raise GatewayError(404, f"Charts are unavailable: run `{ui_assets.INSTALL_COMMAND}` where ingress runs.",
                               code="ui_assets_missing")
        media = VENDOR_TYPES.get(path.suffix, "text/plain; charset=utf-8")
        return Response(path.read_bytes(), media_type=media, headers={"cache-control": "public, max-age=86400"})

    @app.post("/ui/login", include_in_schema=False)
    async def ui_login(request: Request) -> Response:
        """Exchange the master key for a session cookie; failures count like any wrong key (throttled)."""
        refuse_cross_site(request, need_origin=False)
        address = request.client.host if request.client else "unknown"
        gateway.auth_failures.check(address)
        key = await _login_key(request)
        if not is_master(key, gateway.settings.master_key):
            err = GatewayError(401, "That is not the master key.", code="invalid_api_key")
            gateway.auth_failures.failed(address, err, request.url.path)
            raise err
        cookie = sessions_for(gateway.settings.master_key).issue()
        return json_response({"signed_in": True, "expires_in": SESSION_TTL_S}, 200,
                             {"set-cookie": _cookie(cookie, SESSION_TTL_S, request.url.scheme == "https")})

    @app.post("/ui/logout", include_in_schema=False)
    async def ui_logout(request: Request) -> Response:
        refuse_cross_site(request, need_origin=True)
        sessions_for(gateway.settings.master_key).sign_out(request.cookies.get(SESSION_COOKIE))
        return json_response({"signed_in": False}, 200,
                             {"set-cookie": _cookie("", 0, request.url.scheme == "https")})

    @app.get("/v1/dashboard/overview")
    @needs_database
    async def dashboard_overview(request: Request) -> Response:
        await gateway.authenticate_admin(request)
        return json_response(await queries.overview(gateway.database()))

    @app.get("/v1/dashboard/spend")
    @needs_database
    async def dashboard_spend(request: Request, by: By = "model", since: Since = "7d", until: str | None = None,
                              format: Annotated[str, Query(pattern="^(json|csv)$")] = "json") -> Response:
        """Spend per group between `since` and `until` (default now); `format=csv` downloads it."""
        await gateway.authenticate_admin(request)
        if by not in GROUPINGS:
            raise GatewayError(400, f"by must be one of {', '.join(GROUPINGS)}.", param="by", code="invalid_value")
        start, end = _since(since), _since(until, "until") if until else None
        if end is not None and end <= start:
            raise GatewayError(400, "'until' must be after 'since'.", param="until", code="invalid_value")
        rows = await spend(gateway.database(), by=by, since=start.isoformat(),
                           until=end.isoformat() if end else None)
        if format == "csv":
            return _csv(by, rows)
        return json_response({"object": "list", "by": by, "since": start.isoformat(),
                              "until": end.isoformat() if end else None, "data": rows})

    watch = ProviderWatch(gateway.settings.bootstrap_servers, gateway.first_attempt)

    @app.get("/v1/dashboard/providers")
    @needs_database
    async def dashboard_providers(request: Request) -> Response:
        """Each deployment's figures over the last hour (PostgreSQL), its breaker state as the routers hold it
        (`llm.events`) and its provider pool's backlog (the worker group's lag); recent failovers."""
        await gateway.authenticate_admin(request)
        configured = [{"deployment": d.id, "provider": d.provider, "model_group": m.name}
                      for m in gateway.config.models for d in m.deployments]
        rows = await queries.deployments(gateway.database(), configured)
        states = watch.states([r["deployment"] for r in rows])
        pools, backlog_error = await watch.backlogs(gateway.config.providers())
        for row in rows:
            row["state"] = states.get(row["deployment"], "closed") if states is not None else None
            row["pool"] = topics.worker_group(row["provider"]) if row["provider"] in pools else None
            row["backlog"] = pools.get(row["provider"])
        return json_response({"deployments": rows, "failovers": await queries.failovers(gateway.database()),
                              "pools": {topics.worker_group(p): n for p, n in pools.items()},
                              "errors": {"state": None if states is not None else STATES_UNKNOWN,
                                         "backlog": backlog_error}})

    @app.get("/v1/dashboard/keys")
    @needs_database
    async def dashboard_keys(request: Request) -> Response:
        """`GET /v1/keys` plus each key's spend in its budget's current period (`spent_usd`)."""
        await gateway.authenticate_admin(request)
        used = await queries.key_budget_use(gateway.database())
        data = [{**r.public(), "spent_usd": used.get(r.key_id)} for r in await gateway.key_store().all_keys()]
        return json_response({"object": "list", "data": data})

    @app.get("/v1/dashboard/requests")
    @needs_database
    async def dashboard_requests(request: Request, since: Since = "24h", key: str | None = None,
                                 model: str | None = None,
                                 status: Annotated[str | None, Query(pattern="^(ok|error)$")] = None,
                                 limit: Annotated[int, Query(ge=1, le=queries.MAX_ROWS)] = 100) -> Response:
        await gateway.authenticate_admin(request)
        rows = await queries.requests(gateway.database(), since=_since(since), key=key, model=model, status=status,
                                      limit=limit)
        return json_response({"object": "list", "data": rows, "prompts": None})

    @app.get("/v1/dashboard/requests/{request_id}")
    @needs_database
    async def dashboard_request(request: Request, request_id: str) -> Response:
        await gateway.authenticate_admin(request)
        attempts = await queries.request_detail(gateway.database(), request_id)
        if not attempts:
            raise GatewayError(404, "No usage recorded for that request id.", param="request_id",
                               code="request_not_found")
        return json_response({"request_id": request_id, "attempts": attempts,
                              "cost_usd": round(sum(a["cost_usd"] for a in attempts), 10)})


def _csv(by: str, rows: list[dict[str, Any]]) -> Response:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow((by, *CSV_COLUMNS))
    for row in rows:
        group = row.get(by)
        text = "" if group is None else str(group)
        if text[:1] in ("=", "+", "-", "@", "\t", "\r"):  # no formula injection into a spreadsheet
            text = "'" + text
        writer.writerow((text, *(row[c] for c in CSV_COLUMNS)))
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"content-disposition": f'attachment; filename="spend-by-{by}-{stamp}.csv"'})

