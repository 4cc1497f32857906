"""Fake OpenAI (and every OpenAI-compatible API): the demo provider's answers plus recording and faults."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from switchyard.devstack.demo_provider import completion_for, embeddings_for, stream_events
from tests.fakes.server import FakeProvider, sse

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_denied",
                404: "invalid_request_error", 429: "rate_limit_exceeded"}


class FakeOpenAI(FakeProvider):
    """`rpm_limit` makes it enforce a per-API-key limit over a sliding 60 s window, like a real provider:
    calls beyond it get 429 with Retry-After and are counted in `rejected`."""

    name = "openai"

    def __init__(self, rpm_limit: int | None = None) -> None:
        self.rpm_limit = rpm_limit
        self.windows: dict[str, deque[float]] = defaultdict(deque)
        self.rejected = 0
        self.max_in_window = 0
        super().__init__()

    def over_limit(self, request: Request) -> Response | None:
        if self.rpm_limit is None:
            return None
        key = request.headers.get("authorization", "")
        now = time.time()
        with self._lock:
            window = self.windows[key]
            while window and window[0] <= now - 60:
                window.popleft()
            if len(window) >= self.rpm_limit:
                self.rejected += 1
                retry = window[0] + 60 - now
                return Response(orjson.dumps(self.error_body(429, "Rate limit reached for requests")),
                                status_code=429, headers={"retry-after": f"{retry:.0f}"},
                                media_type="application/json")
            window.append(now)
            self.max_in_window = max(self.max_in_window, len(window))
        return None

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.windows.clear()
            self.rejected = 0
            self.max_in_window = 0

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
            recorded = await self.record(request)
            body = orjson.loads(await request.body())
            limited = self.over_limit(request)
            if limited is not None:
                return limited
            fault = self.take_fault(request)
            if fault is not None and fault.latency_ms:
                fault = await self.watched_latency(fault, request, recorded)
                if fault is None:
                    return Response(status_code=499)  # nobody is listening any more
            early = await self.fault_response(fault)
            if early is not None:
                return early
            if not body.get("stream"):
                return Response(orjson.dumps(completion_for(body)), media_type="application/json")
            cut = fault.cut_after if fault else None
            gap_s = fault.chunk_latency_ms / 1000.0 if fault else 0.0

            async def gen():  # type: ignore[no-untyped-def]
                complete = False
                try:
                    for i, event in enumerate(stream_events(body)):
                        if cut is not None and i >= cut:
                            complete = True
                            return
                        if gap_s and i:
                            await asyncio.sleep(gap_s)
                        yield sse(event)
                    yield b"data: [DONE]\n\n"
                    complete = True
                finally:
                    if not complete:  # the client went away mid-stream (the server cancelled this generator)
                        self.client_went_away(recorded)

            return StreamingResponse(gen(), media_type="text/event-stream")

        @self.app.post("/v1/embeddings")
        async def embeddings(request: Request) -> Response:
            await self.record(request)
            early = await self.fault_response(self.take_fault(request))
            if early is not None:
                return early
            body = orjson.loads(await request.body())
            answer = embeddings_for(body)
            dimensions = body.get("dimensions")
            if isinstance(dimensions, int) and dimensions > 0:  # like text-embedding-3: vectors of that length
                for item in answer["data"]:
                    base = item["embedding"]
                    item["embedding"] = [base[i % len(base)] for i in range(dimensions)]
            return Response(orjson.dumps(answer), media_type="application/json")
