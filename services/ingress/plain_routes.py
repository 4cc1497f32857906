"""The hottest route, `POST /v1/chat/completions`, as a plain ASGI app inside the FastAPI application.

FastAPI's per-request machinery (its exception and body-limit middlewares, the router's walk over every route,
the endpoint wrapper, dependency solving, `Response` objects) cost about a third of ingress CPU on this route
(bench/README.md). `PlainRoutes` sits inside the app's own middlewares (hardening, metrics and tracing, request
ids: they apply exactly as to any route) and sends a request for a registered (method, path) straight to the
route's plain app; everything else goes on to FastAPI. The route stays registered with FastAPI, so the OpenAPI
document, `405` for other methods and the metrics' route label are unchanged.

`ChatCompletions` reads and parses the body once (size and depth limits), validates it once, relays it and
writes the answer itself: JSON, or SSE chunk by chunk. An error before the first byte goes to the very
exception handlers the app registered, so its shape and headers are those of every other route; a client that
leaves is noticed by the relay's watcher (the stream ends, the call is settled and its provider call cancelled).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from fastapi import Request
from fastapi.routing import APIRoute

from switchyard.services.ingress.auth import Identity
from switchyard.services.ingress.relay import SSE_HEADERS, Relay, joined, reply_headers
from switchyard.services.ingress.validation import ChatCompletionRequest, read_json, validate

log = logging.getLogger("switchyard.ingress.plain")

ASGIApp = Callable[[Any, Any, Any], Any]
Authenticate = Callable[[Request], Any]

_JSON = b"application/json"
_SSE = b"text/event-stream; charset=utf-8"
_SSE_HEADERS = [(k.encode(), v.encode()) for k, v in SSE_HEADERS.items()]
_END = {"type": "http.response.body", "body": b"", "more_body": False}


def _raw(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers made safe by `safe_headers` (printable ASCII) as ASGI wants them."""
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


class PlainRoutes:
    """ASGI middleware: a request whose (method, path) is in `routes` goes to that route's plain app, with
    `scope["route"]` set as the router would set it; any other request goes on to `app`."""

    def __init__(self, app: ASGIApp, routes: dict[tuple[str, str], APIRoute]) -> None:
        self.app = app
        self.routes = routes
        """Filled in by create_app once the routes exist (before the first request)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        route = self.routes.get((scope.get("method", ""), scope.get("path", ""))) if scope["type"] == "http" \
            else None
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        scope.setdefault("path_params", {})
        await route.app(scope, receive, send)


class ChatCompletions:
    """`POST /v1/chat/completions`: authenticate, read, validate once, relay, answer."""

    def __init__(self, authenticate: Callable[[Request], Any], relay: Relay,
                 exception_handlers: Mapping[Any, Callable[..., Any]]) -> None:
        self.authenticate = authenticate
        self.relay = relay
        self.exception_handlers = exception_handlers
        """The app's own handlers (app.exception_handlers), looked up by the exception's class."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        try:
            identity: Identity = await self.authenticate(request)
            body = await read_json(request)
            parsed = validate(ChatCompletionRequest, body)
            assert isinstance(parsed, ChatCompletionRequest)
            stream = parsed.stream
            call = await self.relay.submit(request, identity, body, parsed.model, "chat", stream)
            first = await self.relay.first(call)
        except Exception as exc:
            await self._error(request, exc, send)
            return
        headers = _raw(reply_headers(first, call.envelope.id))
        if not stream:
            content = orjson.dumps(first.data or {})
            headers += [(b"content-type", _JSON), (b"content-length", str(len(content)).encode())]
            await send({"type": "http.response.start", "status": first.status, "headers": headers})
            await send({"type": "http.response.body", "body": content, "more_body": False})
            return
        frames = joined(self.relay.sse(call, first), call.pending)
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": headers + [(b"content-type", _SSE), *_SSE_HEADERS]})
            async for frame in frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send(_END)
        finally:
            await frames.aclose()
            self.relay.settle(call, None)  # a no-op unless the stream was cut short

    async def _error(self, request: Request, exc: Exception, send: Any) -> None:
        """Answer `exc` through the app's handler for its class (the catch-all 500 handler for a bug)."""
        handler = next((self.exception_handlers[cls] for cls in type(exc).__mro__
                        if cls in self.exception_handlers), None)
        if handler is None:
            raise exc
        response = await handler(request, exc)
        await response(request.scope, request.receive, send)
