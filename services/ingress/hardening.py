"""The HTTP surface's own guards, before any route runs: header bounds, a body that must keep arriving, and the
response headers every API answer carries.

- More than `MAX_HEADERS` headers, or one header (name and value) over `MAX_HEADER_BYTES`, is a 431: nothing
  a client of an LLM API needs comes close, and a route never sees such a request.
- A body that stops arriving (shorter than its Content-Length, or a client that stalls) is a 408 after
  `SWITCHYARD_BODY_TIMEOUT` seconds without a byte (default 30), instead of holding the connection forever.
- Every answer carries `X-Content-Type-Options: nosniff` and, unless the route chose otherwise (SSE streams
  say `no-cache`), `Cache-Control: no-store`: answers hold prompts, completions and keys, which no shared
  cache may keep. (uvicorn's `server` header is turned off where uvicorn is started.)
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from switchyard.services.ingress.responses import error_response
from switchyard.shared.errors import GatewayError

MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 1024
BODY_TIMEOUT_ENV = "SWITCHYARD_BODY_TIMEOUT"
MAX_ECHO_CHARS = 256
"""The most characters of a caller's own value (a model name) an error message repeats."""

SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"))


def echo(value: str) -> str:
    """A caller's value as an error message may repeat it: cut to MAX_ECHO_CHARS."""
    return value if len(value) <= MAX_ECHO_CHARS else value[:MAX_ECHO_CHARS] + "…"


def _oversized(headers: list[tuple[bytes, bytes]]) -> str | None:
    if len(headers) > MAX_HEADERS:
        return f"The request has {len(headers)} headers; at most {MAX_HEADERS} are accepted."
    for name, value in headers:
        if len(name) + len(value) > MAX_HEADER_BYTES:
            return f"A request header is larger than {MAX_HEADER_BYTES} bytes."
    return None


class HardeningMiddleware:
    """Pure ASGI (no task group per request), like RequestIdMiddleware."""

    def __init__(self, app: Any, body_timeout_s: float | None = None) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s or float(os.environ.get(BODY_TIMEOUT_ENV) or 30)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = _oversized(scope.get("headers") or [])
        if problem is not None:
            await error_response(GatewayError(431, problem, type="invalid_request_error",
                                              code="request_header_fields_too_large"))(scope, receive, send)
            return
        timeout_s = self.body_timeout_s
        body_done = False

        async def receive_in_time() -> Any:
            """The body's parts each within timeout_s; after the body, waits as long as the caller does (a
            stream listens for the client's disconnect for its whole length)."""
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(timeout_s):  # no Task per body part, unlike wait_for on 3.11
                    message = await receive()
            except TimeoutError:
                raise GatewayError(408, f"The request body stopped arriving (nothing for {timeout_s:g} s).",
                                   type="invalid_request_error", code="request_timeout") from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def send_hardened(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive_in_time, send_hardened)
