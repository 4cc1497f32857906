"""Fake OpenAI (and every OpenAI-compatible API): the demo provider's answers plus recording and faults."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from shared.devstack.demo_provider import completion_for, embeddings_for, stream_events
from tests.fakes.server import FakeProvider, sse

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_denied",
                404: "invalid_request_error", 429: "rate_limit_exceeded"}


class FakeOpenAI(FakeProvider):
    name = "openai"

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        code = None
        if status == 400 and "context" in message.lower():
            code = "context_length_exceeded"
        elif status == 401:
            code = "invalid_api_key"
        elif status == 429:
            code = "rate_limit_exceeded"
        return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": None,
                          "code": code}}

    def routes(self) -> None:
        @self.app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            await self.record(request)
            body = orjson.loads(await request.body())
            fault = self.take_fault(request)
            early = await self.fault_response(fault)
            if early is not None:
                return early
            if not body.get("stream"):
                return Response(orjson.dumps(completion_for(body)), media_type="application/json")
            cut = fault.cut_after if fault else None

            async def gen():  # type: ignore[no-untyped-def]
                for i, event in enumerate(stream_events(body)):
                    if cut is not None and i >= cut:
                        return
                    yield sse(event)
                yield b"data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        @self.app.post("/v1/embeddings")
        async def embeddings(request: Request) -> Response:
            await self.record(request)
            early = await self.fault_response(self.take_fault(request))
            if early is not None:
                return early
            return Response(orjson.dumps(embeddings_for(orjson.loads(await request.body()))),
                            media_type="application/json")
