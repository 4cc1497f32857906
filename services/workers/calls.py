"""One provider call, start to finish: send what the adapter built, decode, normalise, time it.

Every fault ends as a `CallFailed` carrying a `GatewayError` a client understands, so no body
and no upstream answer can take the worker down:
- a request the adapter cannot translate: 400, not retryable (it fails the same everywhere);
- an upstream answer that cannot be read (body, stream event, error body): 502 `bad_upstream_response`;
- transport faults: connect errors and broken streams 502, silence past the first-byte timeout or
  the deadline 504; all retryable.
Task cancellation is never caught.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from services.workers.aiohttp_transport import AiohttpTransport
from services.workers.providers.base import (
    CallContext,
    ProviderAdapter,
    UpstreamRequest,
    faults_as,
    request_fault,
    response_fault,
    usage_from_openai,
)
from shared.contracts import Usage
from shared.errors import GatewayError

ChunkSink = Callable[[dict[str, Any]], Awaitable[None]]

log = logging.getLogger("switchyard.worker")

TRANSPORT_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, OSError, TimeoutError)
"""Faults of the connection, not of what came over it: they keep their own mapping (`_transport_error`)."""


@dataclass
class CallResult:
    response: dict[str, Any] | None = None
    usage: Usage = field(default_factory=Usage)
    usage_chunk: dict[str, Any] | None = None
    chunks_sent: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    dropped_params: list[str] = field(default_factory=list)


class CallFailed(Exception):
    """A call that failed after `chunks_sent` chunks already reached the caller (0: safe to retry)."""

    def __init__(self, error: GatewayError, chunks_sent: int, latency_ms: float) -> None:
        super().__init__(error.message)
        self.error = error
        self.chunks_sent = chunks_sent
        self.latency_ms = latency_ms


def make_client(max_connections: int = 512) -> httpx.AsyncClient:
    """The pooled client a worker process shares across all its calls (httpx's interface, aiohttp's pool)."""
    return httpx.AsyncClient(
        transport=AiohttpTransport(max_connections),
        timeout=httpx.Timeout(600.0, connect=10.0),
        follow_redirects=False,
    )


def _build(client: httpx.AsyncClient, up: UpstreamRequest, first_byte_timeout: float) -> httpx.Request:
    timeout = httpx.Timeout(connect=min(10.0, first_byte_timeout), read=first_byte_timeout,
                            write=first_byte_timeout, pool=first_byte_timeout)
    content, headers = up.content, up.headers
    if up.json is not None:  # orjson, not httpx's stdlib json: several times faster on a large body
        content = orjson.dumps(up.json)
        if not any(name.lower() == "content-type" for name in headers):
            headers = {"content-type": "application/json", **headers}
    return client.build_request(up.method, up.url, headers=headers, content=content, timeout=timeout)


def _transport_error(exc: Exception, provider: str) -> GatewayError:
    if isinstance(exc, httpx.TimeoutException):
        return GatewayError(504, f"{provider}: upstream did not answer in time ({type(exc).__name__})",
                            code="upstream_timeout", retryable=True)
    return GatewayError(502, f"{provider}: upstream connection failed ({type(exc).__name__})",
                        code="upstream_connection_error", retryable=True)


UPSTREAM_AUTH_ERROR = "upstream_auth_error"
_SECRETS = re.compile(r"(sk|pk|rk|key|AKIA|ASIA)[-_*A-Za-z0-9]{6,}|arn:aws[-a-z]*:[^\s\"',]+|\b\d{12}\b|"
                      r"AIza[-_A-Za-z0-9]{10,}")


def redact(text: str) -> str:
    """`text` with what looks like a key, an AWS account id or an ARN replaced by `[redacted]`."""
    return _SECRETS.sub("[redacted]", text)


def for_caller(err: GatewayError, provider: str, deployment: str) -> GatewayError:
    """The error a caller may see. A provider refusing the gateway's own credentials (401, 403) is the
    operator's problem, and its text can show a masked key, an account id or an IAM role: the caller gets a
    generic 502 `upstream_auth_error` (not retried: the same credentials fail again), the operator's log the
    provider's words, redacted."""
    if err.status not in (401, 403):
        return err
    log.warning("the provider refused the deployment's credentials", extra={
        "provider": provider, "deployment": deployment, "status": err.status, "code": err.code,
        "error": redact(err.message)[:500]})
    return GatewayError(502, f"The gateway could not authenticate with the provider of this model ({provider}); "
                        "the operator has been told.", type="api_error", code=UPSTREAM_AUTH_ERROR, retryable=False)


async def call(
    client: httpx.AsyncClient,
    adapter: ProviderAdapter,
    ctx: CallContext,
    *,
    kind: str = "chat",
    on_chunk: ChunkSink | None = None,
    total_timeout_s: float | None = None,
) -> CallResult:
    """Make one provider call. Streams deliver OpenAI chunks to `on_chunk` as they arrive."""
    started = time.monotonic()
    result = CallResult()
    timeout = min(ctx.deployment.timeout_s, total_timeout_s or ctx.deployment.timeout_s)
    try:
        up = translate(adapter, ctx, kind)
        result.dropped_params = up.dropped_params
        async with asyncio.timeout(max(0.001, timeout)):
            request = _build(client, up, ctx.deployment.first_byte_timeout_s)
            response = await client.send(request, stream=True)
            try:
                with faults_as(response_fault, adapter.name, passing=TRANSPORT_ERRORS):
                    await _answer(adapter, ctx, kind, response, result, on_chunk, started)
            finally:
                await response.aclose()
    except GatewayError as e:
        raise CallFailed(e, result.chunks_sent, _ms(started)) from e
    except TimeoutError:
        err = GatewayError(504, f"{adapter.name}: upstream call exceeded {timeout:.1f}s", code="upstream_timeout",
                           retryable=True)
        raise CallFailed(err, result.chunks_sent, _ms(started)) from None
    except (httpx.HTTPError, OSError) as e:
        raise CallFailed(_transport_error(e, adapter.name), result.chunks_sent, _ms(started)) from e
    except Exception as e:
        log.exception("%s: provider call failed outside translation and parsing", adapter.name)
        err = GatewayError(502, f"{adapter.name}: provider call failed ({type(e).__name__})", code="upstream_error",
                           retryable=True)
        raise CallFailed(err, result.chunks_sent, _ms(started)) from e
    result.latency_ms = _ms(started)
    return result


def translate(adapter: ProviderAdapter, ctx: CallContext, kind: str) -> UpstreamRequest:
    """The adapter's upstream request for `ctx`; any fault translating it is a 400 (`request_fault`)."""
    with faults_as(request_fault, adapter.name):
        return adapter.embeddings_request(ctx) if kind == "embeddings" else adapter.chat_request(ctx)


async def _answer(adapter: ProviderAdapter, ctx: CallContext, kind: str, response: httpx.Response,
                  result: CallResult, on_chunk: ChunkSink | None, started: float) -> None:
    """Read the upstream answer into `result` (or deliver its stream); an error status raises its mapping."""
    if response.status_code >= 400:
        body = await response.aread()
        raise adapter.map_error(response.status_code, body, response.headers)
    if ctx.stream and kind == "chat":
        await _stream(adapter, ctx, response, result, on_chunk, started)
        return
    raw = await response.aread()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise GatewayError(502, f"{adapter.name}: upstream returned malformed JSON",
                           code="bad_upstream_response", retryable=True) from None
    result.response = adapter.parse_embeddings(data, ctx) if kind == "embeddings" else adapter.parse_chat(data, ctx)
    result.usage = adapter.usage_of(result.response, ctx)


async def _stream(adapter: ProviderAdapter, ctx: CallContext, response: httpx.Response, result: CallResult,
                  on_chunk: ChunkSink | None, started: float) -> None:
    parser = adapter.stream_parser(ctx)
    async for event in adapter.events(response):
        for c in parser.feed(event):
            await _deliver(c, result, on_chunk, started, parser.native)
    for c in parser.finish():
        await _deliver(c, result, on_chunk, started, parser.native)
    if parser.native:
        result.usage = usage_from_openai(parser.usage)
    if not parser.done:
        raise GatewayError(502, f"{adapter.name}: upstream stream ended before completion",
                           code="stream_interrupted", retryable=True)


async def _deliver(c: dict[str, Any], result: CallResult, on_chunk: ChunkSink | None, started: float,
                   native: bool = False) -> None:
    if c.get("usage") and not native:  # a native event is relayed as it is; its parser keeps the usage
        result.usage = usage_from_openai(c["usage"])
        if not c.get("choices"):
            result.usage_chunk = c
            return
        c = {k: v for k, v in c.items() if k != "usage"}
    if result.ttft_ms is None:
        result.ttft_ms = _ms(started)
    result.chunks_sent += 1
    if on_chunk is not None:
        await on_chunk(c)


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000.0
