"""One provider call, start to finish: send what the adapter built, decode, normalise, time it.

Every fault ends as a `CallFailed` carrying a `GatewayError` a client understands, so no body
and no upstream answer can take the worker down:
- a request the adapter cannot translate: 400, not retryable (it fails the same everywhere);
- an upstream answer that cannot be read (body, stream event, error body): 502 `bad_upstream_response`;
- transport faults: connect errors and broken streams 502, silence past the first-byte timeout or
  the deadline 504; all retryable;
- a call its client gave up on (`Cancel`): 499 `client_closed_request`, not retryable.
Task cancellation is never caught.

Adapters are typed against httpx's response (`events`, `map_error`); they read only what
`Answer` offers (status, headers' `get`, `aread`, `aiter_bytes`, `aiter_text`), so it is
handed to them as it is, in `_answer` and `_stream` (the two `type: ignore[arg-type]`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from switchyard.services.workers.providers.base import (
    CallContext,
    ProviderAdapter,
    UpstreamRequest,
    faults_as,
    request_fault,
    response_fault,
)
from switchyard.services.workers.providers.openai_shape import usage_from_openai
from switchyard.services.workers.upstream import TRANSPORT_ERRORS, Answer, Upstream, UpstreamClient
from switchyard.shared.contracts import Usage
from switchyard.shared.errors import GatewayError

ChunkSink = Callable[[dict[str, Any]], Awaitable[None]]

log = logging.getLogger("switchyard.worker")


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

    def __init__(self, error: GatewayError, chunks_sent: int, latency_ms: float, usage: Usage | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.chunks_sent = chunks_sent
        self.latency_ms = latency_ms
        self.usage = usage
        """What the provider reported before the call ended (a cancelled stream's tokens so far), if anything."""


def make_client(max_connections: int = 512) -> UpstreamClient:
    """The pooled client a worker process shares across all its calls."""
    return UpstreamClient(max_connections)


def _transport_error(exc: Exception, provider: str) -> GatewayError:
    if isinstance(exc, TimeoutError):  # aiohttp's connect and read timeouts are TimeoutErrors too
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


CLIENT_CLOSED = 499
"""The status of a call stopped because its client went away (nginx's "client closed request")."""


class Cancel:
    """Lets another task stop one provider call (its client went away).

    `cancel()` ends the call at its next await, whether it waits for the provider's first byte or reads
    its stream: the connection is closed (the provider sees the client go) and `call` raises `CallFailed`
    with a 499 `client_closed_request`, carrying the usage the stream reported so far. A cancel before the
    call starts keeps it from starting; one after it ended changes nothing. It works through the call's own
    `asyncio.timeout` (expired at once), so nothing but the call is interrupted and the task's cancellation
    bookkeeping stays exact.
    """

    __slots__ = ("requested", "_scope")

    def __init__(self) -> None:
        self.requested = False
        self._scope: asyncio.Timeout | None = None

    def cancel(self) -> None:
        self.requested = True
        if self._scope is not None and not self._scope.expired():
            self._scope.reschedule(asyncio.get_running_loop().time())


def _cancelled(provider: str) -> GatewayError:
    return GatewayError(CLIENT_CLOSED, f"{provider}: the call was stopped because its client closed the request",
                        type="invalid_request_error", code="client_closed_request", retryable=False)


async def call(
    client: Upstream,
    adapter: ProviderAdapter,
    ctx: CallContext,
    *,
    kind: str = "chat",
    on_chunk: ChunkSink | None = None,
    total_timeout_s: float | None = None,
    cancel: Cancel | None = None,
) -> CallResult:
    """Make one provider call. Streams deliver OpenAI chunks to `on_chunk` as they arrive."""
    started = time.monotonic()
    result = CallResult()
    timeout = min(ctx.deployment.timeout_s, total_timeout_s or ctx.deployment.timeout_s)
    scope: asyncio.Timeout | None = None
    try:
        if cancel is not None and cancel.requested:
            raise _cancelled(adapter.name)
        up = translate(adapter, ctx, kind)
        result.dropped_params = up.dropped_params
        async with asyncio.timeout(max(0.001, timeout)) as scope:
            if cancel is not None:
                cancel._scope = scope
            try:
                response = await client.send(up, ctx.deployment.first_byte_timeout_s, stream=ctx.stream)
                try:
                    with faults_as(response_fault, adapter.name, passing=TRANSPORT_ERRORS):
                        await _answer(adapter, ctx, kind, response, result, on_chunk, started)
                finally:
                    await response.aclose()
            finally:
                if cancel is not None:
                    cancel._scope = None
    except GatewayError as e:
        raise CallFailed(e, result.chunks_sent, _ms(started), result.usage) from e
    except TimeoutError as e:
        if cancel is not None and cancel.requested:
            raise CallFailed(_cancelled(adapter.name), result.chunks_sent, _ms(started), result.usage) from None
        if scope is None or not scope.expired():  # the connect or read timeout, not the call's deadline
            raise CallFailed(_transport_error(e, adapter.name), result.chunks_sent, _ms(started)) from e
        err = GatewayError(504, f"{adapter.name}: upstream call exceeded {timeout:.1f}s", code="upstream_timeout",
                           retryable=True)
        raise CallFailed(err, result.chunks_sent, _ms(started)) from None
    except TRANSPORT_ERRORS as e:
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


async def _answer(adapter: ProviderAdapter, ctx: CallContext, kind: str, response: Answer,
                  result: CallResult, on_chunk: ChunkSink | None, started: float) -> None:
    """Read the upstream answer into `result` (or deliver its stream); an error status raises its mapping."""
    if response.status_code >= 400:
        body = await response.aread()
        raise adapter.map_error(response.status_code, body, response.headers)  # type: ignore[arg-type,unused-ignore]
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


async def _stream(adapter: ProviderAdapter, ctx: CallContext, response: Answer, result: CallResult,
                  on_chunk: ChunkSink | None, started: float) -> None:
    parser = adapter.stream_parser(ctx)
    async for event in adapter.events(response):  # type: ignore[arg-type]
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
