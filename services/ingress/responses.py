"""JSON and error responses, with `x-request-id` on every one."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import orjson
from fastapi.responses import Response

from shared import topics
from shared.errors import GatewayError

_PRINTABLE_BUT_PERCENT = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def header_value(value: str) -> str:
    """`value` as a response header can carry it: printable ASCII as is, anything else percent-encoded.

    Some header values echo what a caller sent (the names of dropped parameters are the body's own field
    names): a non-Latin-1 character would fail to encode (a 500), and CR/LF could split the header.
    """
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe=_PRINTABLE_BUT_PERCENT)


def safe_headers(headers: dict[str, str]) -> dict[str, str]:
    return {name: header_value(value) for name, value in headers.items()}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=safe_headers(headers) if headers else None,
                    media_type="application/json")


def error_response(err: GatewayError, request_id: str | None = None) -> Response:
    headers = err.response_headers()
    if request_id:
        headers[topics.HEADER_REQUEST_ID] = request_id
    return json_response(err.body(), err.status, headers)
