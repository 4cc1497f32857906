"""JSON and error responses, with `x-request-id` on every one."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

from shared import topics
from shared.errors import GatewayError


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


def error_response(err: GatewayError, request_id: str | None = None) -> Response:
    headers = err.response_headers()
    if request_id:
        headers[topics.HEADER_REQUEST_ID] = request_id
    return json_response(err.body(), err.status, headers)
