"""Every failure of a route answers in the route's error shape, never plain text and never a bare 500.

A `GatewayError` is OpenAI's error body with its status and headers; FastAPI's own 404/405/validation errors are
recast the same way; a PostgreSQL failure that escaped its handler is a 503 + Retry-After (the database is down,
the gateway is not); anything else is logged and answered with a 500 `internal_error`, in Anthropic's shape on
Anthropic's paths.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from switchyard.services.ingress import anthropic_api
from switchyard.services.ingress.database import DATABASE_ERRORS, database_unavailable
from switchyard.services.ingress.openapi import ANTHROPIC_PATHS
from switchyard.services.ingress.responses import error_response, json_response
from switchyard.shared import topics
from switchyard.shared.errors import GatewayError

log = logging.getLogger("switchyard.ingress")


def add_error_handlers(app: FastAPI) -> None:
    """Install the handlers on `app` (before the routes that rely on them)."""

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(exc, getattr(request.state, "request_id", None))

    async def database_error(request: Request, exc: Exception) -> Response:
        """A safety net: a PostgreSQL failure that escaped its handler is a 503 + Retry-After, never a 500."""
        log.warning("database call failed", extra={"path": request.url.path, "error": repr(exc)[:300]})
        return error_response(database_unavailable(), getattr(request.state, "request_id", None))

    for error_type in DATABASE_ERRORS:
        if error_type not in (OSError, TimeoutError):  # too broad to claim for the database
            app.add_exception_handler(error_type, database_error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = "Not found." if exc.status_code == 404 else str(exc.detail)
        return error_response(GatewayError(exc.status_code, message), getattr(request.state, "request_id", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(GatewayError(400, str(exc)), getattr(request.state, "request_id", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        """The last safety net: a bug answers a 500 in the route's error shape (never plain text), logged."""
        log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
        err = GatewayError(500, "The gateway failed to handle this request.", code="internal_error")
        request_id = getattr(request.state, "request_id", None)
        if request.url.path in ANTHROPIC_PATHS and request_id:
            return anthropic_error(err, request_id)
        return error_response(err, request_id)


def anthropic_error(err: GatewayError, request_id: str, extra: dict[str, str] | None = None) -> Response:
    """`err` as Anthropic's error body, with both request-id headers (Switchyard's and Anthropic's)."""
    headers = {**(extra or {}), **err.response_headers(), topics.HEADER_REQUEST_ID: request_id,
               "request-id": request_id}
    return json_response(anthropic_api.error_body(err, request_id), err.status, headers)
