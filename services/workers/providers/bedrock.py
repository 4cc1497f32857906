"""Amazon Bedrock through the Converse API, translated to and from OpenAI's chat format: the adapter.

Request: bedrock_request.py; answers and streams: bedrock_response.py; errors and the event stream:
bedrock_wire.py; embeddings: bedrock_embeddings.py.

Wire format:
  chat        POST {base}/model/{modelId}/converse
  stream      POST {base}/model/{modelId}/converse-stream   (AWS binary event stream)
  embeddings  POST {base}/model/{modelId}/invoke            (Titan or Cohere embed bodies)
`base` is the deployment's `api_base`, else `https://bedrock-runtime.{region}.amazonaws.com`; the
model id (a model id, an inference profile id or an ARN) is URI-encoded into one path segment.

Auth, first that applies:
  1. the deployment's `aws_access_key_id` / `aws_secret_access_key` (+ `aws_session_token`):
     SigV4 for service `bedrock` in `region` (`services/workers/providers/sigv4.py`);
  2. the deployment's `api_key` (rotated by the pacer like any key): a Bedrock API key, sent as
     `Authorization: Bearer`;
  3. the worker's environment, as the AWS SDKs read it: `AWS_ACCESS_KEY_ID` /
     `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, then `AWS_BEARER_TOKEN_BEDROCK`.
  Instance-profile, IRSA and SSO credentials are not fetched (an adapter does no I/O): give them
  to the worker through those variables. Region: `region`, else the one in an AWS `api_base`
  host, else `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from switchyard.services.workers.providers import sigv4
from switchyard.services.workers.providers.base import (
    CallContext,
    ProviderAdapter,
    ServerEvent,
    StreamParser,
    UpstreamRequest,
)
from switchyard.services.workers.providers.bedrock_embeddings import embeddings_body, openai_embeddings
from switchyard.services.workers.providers.bedrock_request import build_body
from switchyard.services.workers.providers.bedrock_response import BedrockStream, openai_message
from switchyard.services.workers.providers.bedrock_response import usage_from_bedrock as usage_from_bedrock
from switchyard.services.workers.providers.bedrock_wire import SERVICE, EventStreamDecoder, bedrock_error
from switchyard.services.workers.providers.bedrock_wire import _frame_event as _frame_event
from switchyard.services.workers.providers.openai_shape import (
    error_message,
    retry_after_seconds,
)
from switchyard.services.workers.providers.reading import encode_json
from switchyard.shared.config_schema import Deployment
from switchyard.shared.errors import GatewayError

DEFAULT_REGION = "us-east-1"


def _region(dep: Deployment) -> str:
    if dep.region:
        return dep.region
    if dep.api_base:
        m = re.match(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com", urlsplit(dep.api_base).hostname or "")
        if m:
            return m[1]
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def _credentials(dep: Deployment, api_key: str | None) -> sigv4.Credentials | str | None:
    """SigV4 credentials, a Bedrock API key (bearer), or None: deployment first, then the environment."""
    if dep.aws_access_key_id and dep.aws_secret_access_key:
        return sigv4.Credentials(dep.aws_access_key_id, dep.aws_secret_access_key, dep.aws_session_token)
    if api_key:
        return api_key
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return sigv4.Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                                 env.get("AWS_SESSION_TOKEN") or None)
    return env.get("AWS_BEARER_TOKEN_BEDROCK") or None


class BedrockAdapter(ProviderAdapter):
    name = "bedrock"

    def _url(self, ctx: CallContext, operation: str) -> str:
        dep = ctx.deployment
        base = (dep.api_base or f"https://bedrock-runtime.{_region(dep)}.amazonaws.com").rstrip("/")
        return f"{base}/model/{quote(dep.model, safe='')}/{operation}"

    def _request(self, ctx: CallContext, operation: str, body: dict[str, Any],
                 dropped: list[str]) -> UpstreamRequest:
        url = self._url(ctx, operation)
        content = encode_json(body, ctx.body, SERVICE)
        headers = {"content-type": "application/json", **ctx.deployment.headers}
        creds = _credentials(ctx.deployment, ctx.api_key)
        if isinstance(creds, sigv4.Credentials):
            headers = sigv4.sign("POST", url, headers, content, creds, _region(ctx.deployment), SERVICE)
        elif creds:
            headers["authorization"] = f"Bearer {creds}"
        else:
            raise GatewayError(401, f"bedrock: deployment {ctx.deployment.id or ctx.deployment.model!r} has no "
                               "credentials (set aws_access_key_id and aws_secret_access_key, or api_key)",
                               code="invalid_api_key", retryable=False)
        return UpstreamRequest("POST", url, headers, content=content, dropped_params=dropped)

    # ---- chat ----
    def chat_request(self, ctx: CallContext) -> UpstreamRequest:
        body, dropped = build_body(ctx)
        return self._request(ctx, "converse-stream" if ctx.stream else "converse", body, dropped)
    def parse_chat(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        return openai_message(data, ctx)

    def stream_parser(self, ctx: CallContext) -> StreamParser:
        return BedrockStream(ctx)

    async def events(self, response: httpx.Response) -> AsyncIterator[ServerEvent]:
        decoder = EventStreamDecoder()
        async for data in response.aiter_bytes():
            for headers, payload in decoder.feed(data):
                event = _frame_event(headers, payload)
                if event is not None:
                    yield event
        decoder.feed(b"")  # a corrupt frame after the last good ones of a read raises now
        if decoder.pending:
            raise GatewayError(502, "bedrock: upstream stream ended inside an event frame", code="stream_interrupted",
                               retryable=True)

    # ---- embeddings ----
    def embeddings_request(self, ctx: CallContext) -> UpstreamRequest:
        body, dropped = embeddings_body(ctx)
        return self._request(ctx, "invoke", body, dropped)

    def parse_embeddings(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        return openai_embeddings(data, ctx)

    # ---- errors ----
    def map_error(self, status: int, body: bytes, headers: httpx.Headers) -> GatewayError:
        message, err = error_message(body)
        if isinstance(err.get("Message"), str):  # some AWS front ends capitalise it
            message = err["Message"]
        kind = headers.get("x-amzn-errortype") or str(err.get("__type") or "")
        return bedrock_error(status, kind, message, retry_after_seconds(headers))
