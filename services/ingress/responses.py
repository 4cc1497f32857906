"""JSON and error responses, with `x-request-id` on every one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import orjson
from fastapi.responses import Response, StreamingResponse

from switchyard.shared import topics
from switchyard.shared.errors import GatewayError

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


class LastPart(bytes):
    """A stream's last bytes: sent as the response's end (`more_body=False`), so they and the end of the
    chunked body leave in one write rather than two."""


class SettlingStream(StreamingResponse):
    """A streaming response that calls `on_close` once it is over, however it ends: sent in full, the client
    gone before its first byte or midway, or cancelled. Its body generator alone cannot promise that: one
    never started runs no `finally`, and one abandoned midway runs it only when garbage-collected. A body part
    that is a `LastPart` ends the response."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def stream_response(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        async for part in self.body_iterator:
            if ended:  # only a bug yields after the last part: not sent (the response is over)
                continue
            ended = isinstance(part, LastPart)
            await send({"type": "http.response.body", "body": part, "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
