"""Fake Azure OpenAI: OpenAI's answers behind `/openai/deployments/{deployment}/...?api-version=...`.

It refuses a request without `api-version` (404, as Azure does) or without an `api-key` header
or Bearer token (401), answers an unknown deployment with 404 `DeploymentNotFound`, and adds
Azure's content-filter annotations: `prompt_filter_results` (and in streams a first chunk with
empty `choices`), `content_filter_results` on choices, and one annotation-only chunk. A user
message containing FILTER_TRIGGER ends with `finish_reason: "content_filter"`.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from switchyard.devstack.demo_provider import completion_for, embeddings_for, stream_events
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import sse

FILTER_TRIGGER = "forbidden-topic"
SAFE = {name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")}
PROMPT_FILTER = [{"prompt_index": 0, "content_filter_results": {**SAFE, "jailbreak": {"filtered": False,
                                                                                     "detected": False}}}]
UNDERLYING_MODEL = "gpt-4o-mini-2024-07-18"


class FakeAzureOpenAI(FakeOpenAI):
    name = "azure"

    def __init__(self, deployments: set[str] | None = None) -> None:
        self.deployments = deployments
        """Deployment names that exist; None accepts any."""
        super().__init__()

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        text = message.lower()
        if status == 400 and "context" in text:
            return {"error": {"message": message, "type": "invalid_request_error", "param": "messages",
                              "code": "context_length_exceeded"}}
        if status == 400 and ("filter" in text or "policy" in text):
            return {"error": {"message": message, "type": None, "param": "prompt", "code": "content_filter",
                              "status": 400, "innererror": {
                                  "code": "ResponsibleAIPolicyViolation",
                                  "content_filter_result": {**SAFE, "violence": {"filtered": True,
                                                                                 "severity": "high"}}}}}
        if status == 404:
            return {"error": {"code": "DeploymentNotFound", "message": message}}
        if status in (401, 429):
            return {"error": {"code": str(status), "message": message}}
        return {"error": {"code": "InternalServerError" if status >= 500 else "BadRequest", "message": message}}

    def _json(self, status: int, body: dict[str, Any]) -> Response:
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

    def _refuse(self, request: Request, deployment: str) -> Response | None:
        if not request.query_params.get("api-version"):
            return self._json(404, {"error": {"code": "404", "message": "Resource not found"}})
        bearer = request.headers.get("authorization", "").startswith("Bearer ")
        if not request.headers.get("api-key") and not bearer:
            return self._json(401, self.error_body(401, "Access denied due to invalid subscription key or wrong "
                                                        "API endpoint. Make sure to provide a valid key for an "
                                                        "active subscription and use a correct regional API "
                                                        "endpoint for your resource."))
        if self.deployments is not None and deployment not in self.deployments:
            return self._json(404, self.error_body(404, "The API deployment for this resource does not exist. If "
                                                        "you created the deployment within the last 5 minutes, "
                                                        "please wait a moment and try again."))
        return None

    def routes(self) -> None:
        @self.app.post("/openai/deployments/{deployment}/chat/completions")
        async def chat(deployment: str, request: Request) -> Response:
            await self.record(request)
            refused = self._refuse(request, deployment)
            if refused is not None:
                return refused
            body = {**orjson.loads(await request.body()), "model": UNDERLYING_MODEL}
            fault = self.take_fault(request)
            early = await self.fault_response(fault)
            if early is not None:
                return early
            filtered = FILTER_TRIGGER in orjson.dumps(body.get("messages")).decode()
            if not body.get("stream"):
                done = completion_for(body)
                done["prompt_filter_results"] = PROMPT_FILTER
                for choice in done["choices"]:
                    choice["content_filter_results"] = SAFE
                    if filtered:
                        choice["finish_reason"] = "content_filter"
                        choice["message"]["content"] = None
                return self._json(200, done)
            cut = fault.cut_after if fault else None

            def events() -> list[dict[str, Any]]:
                out: list[dict[str, Any]] = [{"id": "", "object": "", "created": 0, "model": "", "choices": [],
                                              "prompt_filter_results": PROMPT_FILTER}]
                for event in stream_events(body):
                    for choice in event["choices"]:
                        choice["content_filter_results"] = {} if choice["delta"].get("role") else SAFE
                        if filtered and choice["finish_reason"]:
                            choice["finish_reason"] = "content_filter"
                    if filtered and event["choices"] and event["choices"][0]["delta"].get("content"):
                        continue
                    if event["choices"] and event["choices"][0]["finish_reason"]:
                        # an asynchronous-filter annotation: no delta, just results and offsets
                        out.append({"id": "", "object": "", "created": 0, "model": "", "choices": [
                            {"index": 0, "finish_reason": None, "content_filter_results": SAFE,
                             "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": 9}}]})
                    out.append(event)
                return out

            async def gen():  # type: ignore[no-untyped-def]
                for i, event in enumerate(events()):
                    if cut is not None and i >= cut:
                        return
                    yield sse(event)
                yield b"data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        @self.app.post("/openai/deployments/{deployment}/embeddings")
        async def embeddings(deployment: str, request: Request) -> Response:
            await self.record(request)
            refused = self._refuse(request, deployment)
            if refused is not None:
                return refused
            early = await self.fault_response(self.take_fault(request))
            if early is not None:
                return early
            body = orjson.loads(await request.body())
            return self._json(200, embeddings_for({**body, "model": "text-embedding-3-small"}))
