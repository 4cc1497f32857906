"""Every request's id and extra response headers, set before any route or error handler runs."""

from __future__ import annotations

import uuid
from typing import Any

from switchyard.shared import topics


class RequestIdMiddleware:
    """Gives every request an id (`request.state.request_id`) and a dict of extra response headers
    (`request.state.extra_headers`, e.g. rate-limit headers), added to the response unless already set.

    Pure ASGI on purpose: `@app.middleware("http")` (BaseHTTPMiddleware) runs every request through
    an anyio task group and memory streams, about a fifth of ingress CPU under load (bench/README.md).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["request_id"] = request_id = uuid.uuid4().hex
        state["extra_headers"] = {}

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                wanted = {topics.HEADER_REQUEST_ID: request_id, **state["extra_headers"]}
                headers += [(k.encode(), v.encode()) for k, v in wanted.items() if k.lower().encode() not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
