"""The Responses API routes: `POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}` and
`GET /v1/responses/{id}/input_items`.

A create request is translated to a chat request (responses_api.py) and goes through the same
pipeline as `/v1/chat/completions` (`Pipeline`: the key's limits and budget, routing, failover,
pacing, usage and spend), so every configured provider serves it. With `store` (the default) and a
database, the answer is stored (responses_store.py) before the client sees it, so a follow-up with
`previous_response_id` always finds it; if PostgreSQL fails at that moment the answer is still
returned, with `"store": false`, rather than lost. Errors before the first byte are OpenAI-style
error bodies with the right status; a failure mid-stream ends the stream with `response.failed`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from switchyard.services.ingress import responses_api as api
from switchyard.services.ingress import responses_output as out
from switchyard.services.ingress.anthropic_api import format_sse
from switchyard.services.ingress.auth import Identity
from switchyard.services.ingress.openapi import json_body
from switchyard.services.ingress.responses import header_value, json_response
from switchyard.services.ingress.responses_store import ResponseStore, page
from switchyard.services.ingress.responses_stream import ResponseStream
from switchyard.services.ingress.validation import ChatCompletionRequest, read_json, validate
from switchyard.shared import topics
from switchyard.shared.contracts import Reply
from switchyard.shared.errors import GatewayError

log = logging.getLogger("switchyard.ingress.responses")

_CHAT_PARAMS = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format"}
"""Chat parameter names the chat validator may blame, as the caller named them."""


@dataclass
class Pipeline:
    """The chat path's steps, as create_app defines them (submit, first reply, the rest of a stream)."""

    submit: Callable[[Request, Identity, dict[str, Any], str, str, bool], Awaitable[Any]]
    first: Callable[[Any], Awaitable[Reply]]
    rest: Callable[[Any, Reply], AsyncIterator[Reply]]
    headers: Callable[[Reply, str], dict[str, str]]
    stream: Callable[[Any, AsyncGenerator[bytes, None], dict[str, str]], Response]
    """The SSE response for a call's frames; it ends the call once (its limits given back) however it ends."""


def _validate_chat(body: dict[str, Any]) -> None:
    try:
        validate(ChatCompletionRequest, body)
    except GatewayError as e:
        if e.param:
            root = e.param.split(".")[0].split("[")[0]
            e.param = "input" if root == "messages" else _CHAT_PARAMS.get(root, e.param)
            e.message = e.message.replace("max_completion_tokens", "max_output_tokens")
        raise


def _int_query(request: Request, name: str, default: int, low: int, high: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise GatewayError(400, f"'{name}' must be an integer from {low} to {high}.", param=name,
                           code="invalid_value")
    return int(value)


def add_responses_routes(app: FastAPI, gateway: Any, pipeline: Pipeline) -> None:
    """Register the routes on `app`; `gateway` is the ingress Gateway (authentication, database pools)."""

    def store() -> ResponseStore:
        return ResponseStore(gateway.request_database())  # a 503 when no database is configured

    async def keep(identity: Identity, raw: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
        """Store `response` when asked and possible; the object says whether it was stored."""
        if not response["store"]:
            return response
        if not gateway.settings.database_url:
            return {**response, "store": False}
        try:
            turn = api.conversation(raw, None, response["output"])
            await store().save(identity, response, api.input_items(raw), turn)
        except GatewayError as e:
            log.warning("could not store a response", extra={"response_id": response["id"], "error": e.message})
            return {**response, "store": False}
        return response

    @app.post("/v1/responses", openapi_extra=json_body(api.ResponsesCreateRequest))
    async def create_response(request: Request) -> Response:
        identity = await gateway.authenticate(request)
        raw = await read_json(request)
        api.check_request(raw)
        previous = raw.get("previous_response_id")
        history = await store().history(identity, previous) if previous else None
        body = api.to_chat_request(raw, history)
        _validate_chat(body)
        model, stream = str(raw["model"]), bool(raw.get("stream"))
        rid = out.response_id(request.state.request_id)
        call = await pipeline.submit(request, identity, body, model, "chat", stream)
        first = await pipeline.first(call)
        headers = pipeline.headers(first, request.state.request_id)
        dropped = api.dropped_params(raw)
        if dropped:
            headers[topics.HEADER_DROPPED_PARAMS] = header_value(",".join(dropped))
        if not stream:
            answer = out.from_chat_completion(first.data or {}, raw, rid)
            return json_response(await keep(identity, raw, answer), 200, headers)

        async def relay() -> AsyncGenerator[bytes, None]:
            translator = ResponseStream(out.skeleton(rid, raw))
            async for reply in pipeline.rest(call, first):
                if reply.type == "error":
                    events = translator.fail(GatewayError.from_body(reply.status, reply.data, reply.headers))
                else:
                    events = [event for chunk in reply.pieces() for event in translator.feed(chunk)]
                if events:
                    yield b"".join(format_sse(event["type"], event) for event in events)
                if reply.type == "error":
                    return
            events = translator.finish()
            assert translator.final is not None
            stored = await keep(identity, raw, translator.final)
            events[-1]["response"] = stored
            yield b"".join(format_sse(event["type"], event) for event in events)

        return pipeline.stream(call, relay(), headers)

    @app.get("/v1/responses/{response_id}")
    async def get_response(request: Request, response_id: str) -> Response:
        identity = await gateway.authenticate(request)
        if request.query_params.get("stream") in ("true", "1"):
            raise GatewayError(400, "Replaying a stored response as a stream is not supported.", param="stream",
                               code="unsupported_parameter")
        return json_response(await store().get(identity, response_id))

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(request: Request, response_id: str) -> Response:
        identity = await gateway.authenticate(request)
        await store().delete(identity, response_id)
        return json_response({"id": response_id, "object": "response", "deleted": True})

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(request: Request, response_id: str) -> Response:
        identity = await gateway.authenticate(request)
        limit = _int_query(request, "limit", 20, 1, 100)
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise GatewayError(400, "'order' must be 'asc' or 'desc'.", param="order", code="invalid_value")
        items = await store().input_items(identity, response_id)
        return json_response(page(items, after=request.query_params.get("after"), limit=limit, order=order))
