"""Ingress wiring: the OpenAI-compatible HTTP API in front of Kafka.

A request is authenticated, validated, written to `llm.requests` as an envelope naming
this instance's reply partition, and answered from that partition: JSON, or SSE relayed
chunk by chunk. Every accepted request gets exactly one answer; the deadline bounds the wait.

This module builds the app: its middleware, error handlers (error_handlers.py) and routes. The state behind
them is the `Gateway` (gateway.py); the request relay is `Relay` (relay.py).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from switchyard.services.ingress import anthropic_api, completions, openapi
from switchyard.services.ingress.admin import add_admin_routes
from switchyard.services.ingress.batches import add_batch_routes
from switchyard.services.ingress.completions import CompletionRequest
from switchyard.services.ingress.error_handlers import add_error_handlers, anthropic_error
from switchyard.services.ingress.files import add_file_routes
from switchyard.services.ingress.gateway import Admitted, Gateway
from switchyard.services.ingress.hardening import HardeningMiddleware
from switchyard.services.ingress.observability import ObservabilityMiddleware
from switchyard.services.ingress.openapi import OPENAPI_URL, json_body
from switchyard.services.ingress.plain_routes import ChatCompletions, PlainRoutes
from switchyard.services.ingress.prompt_logs import add_log_routes
from switchyard.services.ingress.relay import Relay, reply_headers
from switchyard.services.ingress.request_ids import RequestIdMiddleware
from switchyard.services.ingress.responses import header_value, json_response
from switchyard.services.ingress.responses_routes import Pipeline, add_responses_routes
from switchyard.services.ingress.ui.routes import add_ui_routes
from switchyard.services.ingress.validation import ChatCompletionRequest, EmbeddingsRequest, read_json, validate
from switchyard.shared import metrics, topics
from switchyard.shared.errors import GatewayError

__all__ = ["Admitted", "Gateway", "create_app", "reply_partition_from_env"]

log = logging.getLogger("switchyard.ingress")

# FastAPI >= 0.16x asks OpenTelemetry for its tracer/meter/logger providers on every request (each a
# read of os.environ), ~5% of ingress CPU under load; Switchyard has no OpenTelemetry set-up to feed.
_NO_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {}
)


def create_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        log.info("ingress ready", extra={"reply_partition": gateway.reply_partition})
        yield
        await gateway.stop()

    app = FastAPI(title="Switchyard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=OPENAPI_URL,
                  **_NO_TELEMETRY)
    app.state.gateway = gateway
    pipeline = Relay(gateway)
    openapi.install(app)

    plain: dict[tuple[str, str], APIRoute] = {}
    app.add_middleware(PlainRoutes, routes=plain)  # innermost: the hot route skips FastAPI's own per-request work
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(ObservabilityMiddleware)
    app.add_middleware(HardeningMiddleware)  # outermost: bad headers never reach a route

    add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        """Liveness, how many callers wait for a reply on this replica, and whether admissions are held
        (services/ingress/hold.py)."""
        return json_response({"status": "ok", "waiting": gateway.replies.waiting, "held": gateway.hold.held,
                              "sending": gateway.hold.sending})

    @app.get("/ready")
    async def ready() -> Response:
        ok = gateway.ready
        body: dict[str, Any] = {"ready": ok}
        if gateway.keys is not None:
            body["keys_loaded"] = gateway.keys.loaded
        return json_response(body, 200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Prometheus text of this ingress process (shared/metrics.py)."""
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        identity = await gateway.authenticate(request)
        data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "switchyard"}
                for m in gateway.config.models if identity.may_use(m.name)]
        return json_response({"object": "list", "data": data})

    @app.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        """Documents the operation; requests are served by the route's plain app (plain_routes.py)."""
        raise AssertionError("POST /v1/chat/completions is served by ChatCompletions")

    chat_route = app.router.routes[-1]
    assert isinstance(chat_route, APIRoute) and chat_route.path == "/v1/chat/completions"
    chat_route.app = ChatCompletions(gateway.authenticate, pipeline, app.exception_handlers)
    plain[("POST", chat_route.path)] = chat_route

    @app.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
    async def legacy_completions(request: Request) -> Response:
        identity = await gateway.authenticate(request)
        raw = await read_json(request)
        parsed = validate(CompletionRequest, raw)
        assert isinstance(parsed, CompletionRequest)
        body = completions.to_chat(raw, parsed)
        validate(ChatCompletionRequest, body)
        return await pipeline.dispatch(request, identity, body, parsed.model, "chat", parsed.stream,
                                       completions.from_chat, completions.chunk_from_chat)

    @app.post("/v1/embeddings", openapi_extra=json_body(EmbeddingsRequest))
    async def embeddings(request: Request) -> Response:
        identity = await gateway.authenticate(request)
        body = await read_json(request)
        parsed = validate(EmbeddingsRequest, body)
        assert isinstance(parsed, EmbeddingsRequest)
        return await pipeline.dispatch(request, identity, body, parsed.model, "embeddings", False)

    add_admin_routes(app, gateway)
    add_file_routes(app, gateway)
    add_batch_routes(app, gateway)
    add_ui_routes(app, gateway)
    add_log_routes(app, gateway)

    @app.post("/v1/messages", openapi_extra=json_body("AnthropicMessagesRequest"))
    async def anthropic_messages(request: Request) -> Response:
        request_id: str = request.state.request_id
        try:
            identity = await gateway.authenticate(request)
            raw = await read_json(request)
            lossy: anthropic_api.Lossy = []  # what OpenAI's format cannot express: Anthropic deployments only
            body = anthropic_api.to_openai_request(raw, lossy)
            validate(ChatCompletionRequest, body)
            model, stream = str(raw["model"]), bool(body.get("stream"))
            request.state.native = anthropic_api.native_request(raw, request.headers, lossy)  # passthrough
            call = await pipeline.submit(request, identity, body, model, "chat", stream)
            first = await pipeline.first(call)
        except GatewayError as e:
            return anthropic_error(e, request_id, request.state.extra_headers)
        headers = {**reply_headers(first, request_id), "request-id": request_id}
        dropped = [] if first.format == "anthropic" else anthropic_api.dropped_params(raw)  # passed through: none
        if dropped:
            headers[topics.HEADER_DROPPED_PARAMS] = header_value(",".join(dropped))
        if not stream:
            answer = first.data if first.format == "anthropic" else anthropic_api.from_openai_response(
                first.data or {}, model)
            return json_response(answer or {}, 200, headers)

        async def relay() -> AsyncGenerator[bytes, None]:
            events = anthropic_api.AnthropicEvents(model)
            async for reply in pipeline.rest(call, first):
                if reply.type == "error":
                    err = GatewayError.from_body(reply.status, reply.data, reply.headers)
                    yield anthropic_api.format_sse(*anthropic_api.error_event(err, request_id))
                    return
                if chunks := reply.pieces():
                    yield b"".join(events.chunk(chunk, reply.format) for chunk in chunks)
            yield events.finish()

        return pipeline.stream(call, relay(), headers)

    @app.post("/v1/messages/count_tokens", openapi_extra=json_body("AnthropicCountTokensRequest"))
    async def anthropic_count_tokens(request: Request) -> Response:
        request_id: str = request.state.request_id
        try:
            await gateway.authenticate(request)
            counted = anthropic_api.estimate_tokens(await read_json(request))
        except GatewayError as e:
            return anthropic_error(e, request_id)
        return json_response(counted, 200, {anthropic_api.ESTIMATE_HEADER: "true", "request-id": request_id})

    add_responses_routes(app, gateway, Pipeline(pipeline.submit, pipeline.first, pipeline.rest, reply_headers,
                                                pipeline.stream))
    return app


def reply_partition_from_env(value: str | None) -> int:
    """An explicit partition number, or `ordinal`: the trailing -N of the hostname (a StatefulSet pod)."""
    if not value:
        return 0
    if value == "ordinal":
        import socket

        suffix = socket.gethostname().rsplit("-", 1)[-1]
        if not suffix.isdigit():
            raise ValueError(f"hostname {socket.gethostname()!r} has no -N ordinal suffix")
        return int(suffix)
    return int(value)
