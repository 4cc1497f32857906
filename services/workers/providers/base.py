"""The one small interface every provider adapter implements (helpers they share: reading.py for request
bodies, openai_shape.py for answers, shared/formats.py for what ingress reads too).

An adapter translates; it never does I/O. The worker (`services/workers/calls.py`) sends
what `chat_request` builds with its pooled httpx client, turns each decoded stream
event into OpenAI chunks with the adapter's `StreamParser`, and maps error bodies
with `map_error`. Everything an adapter returns is already in OpenAI's shape.

An adapter raises nothing but `GatewayError`: a request it cannot translate is a 400 that
names the parameter (read through the helpers of reading.py), an upstream
answer it cannot read a retryable 502; any other exception is turned into one of those at the
adapter's boundary (`faults_as`, applied to every subclass by `__init_subclass__`), so one body
or one answer can never take down the worker running it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from switchyard.services.workers.providers.openai_shape import openai_style_error, usage_from_openai
from switchyard.services.workers.providers.sse import ServerEvent as ServerEvent
from switchyard.services.workers.providers.sse import iter_sse as iter_sse
from switchyard.shared.config_schema import Deployment
from switchyard.shared.contracts import NativeRequest, Usage
from switchyard.shared.errors import GatewayError

GATEWAY_FIELDS = ("fallbacks", "strict")
"""Body fields Switchyard reads itself and never forwards upstream."""

log = logging.getLogger("switchyard.worker.adapters")


# ---- faults: what an exception an adapter did not foresee becomes ------------------------------

Fault = Callable[[str, Exception], GatewayError]


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def request_fault(provider: str, exc: Exception) -> GatewayError:
    """A fault while translating a request: a 400, never retryable.

    Translation reads nothing but the body, so the same body fails the same way on every
    deployment; retrying it would only spend the caller's time. It is logged with its traceback,
    since it marks a shape the adapter should name precisely (with its `param`) instead.
    """
    log.warning("%s: request translation failed on an unforeseen body shape", provider, exc_info=exc)
    return GatewayError(400, f"{provider}: the request could not be translated ({_describe(exc)})",
                        code="invalid_value", retryable=False)


def response_fault(provider: str, exc: Exception) -> GatewayError:
    """A fault while reading a provider's answer (body, stream event, error body): a retryable 502."""
    return GatewayError(502, f"{provider}: could not parse upstream response ({_describe(exc)})",
                        code="bad_upstream_response", retryable=True)


class faults_as:  # noqa: N801 - used as `with faults_as(...)`, like contextlib's helpers
    """A block that raises only `GatewayError` (or one of `passing`): any other `Exception` becomes `fault`.

    Only `Exception`s are converted: task cancellation and interpreter exit propagate untouched. `_guarded` applies
    the same rule inline to the adapter methods that run per stream event: a generator per event (`@contextmanager`)
    cost a stream ~5 % of the worker's call path (bench/worker_call.py --stream), and this object per event ~4 %.
    """

    __slots__ = ("fault", "provider", "passing")

    def __init__(self, fault: Fault, provider: str, passing: tuple[type[Exception], ...] = ()) -> None:
        self.fault = fault
        self.provider = provider
        self.passing = passing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, (GatewayError, *self.passing)):
            return
        raise self.fault(self.provider, exc) from exc


def _guard_methods(cls: type, names: tuple[str, ...], fault: Fault, provider: Callable[[Any], str]) -> None:
    """Wrap the methods `names` that `cls` itself defines so that they fault as `faults_as(fault, ...)` does."""
    for name in names:
        method = cls.__dict__.get(name)
        if callable(method):
            setattr(cls, name, _guarded(method, fault, provider))


def _guarded(method: Callable[..., Any], fault: Fault, provider: Callable[[Any], str]) -> Callable[..., Any]:
    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:  # `faults_as`, inline: it runs per stream event
        try:
            return method(self, *args, **kwargs)
        except GatewayError:
            raise
        except Exception as exc:
            raise fault(provider(self), exc) from exc

    return guarded


@dataclass
class CallContext:
    """What an adapter needs to translate one request. `body` is the validated OpenAI request body."""

    deployment: Deployment
    body: dict[str, Any]
    stream: bool
    api_key: str | None
    request_id: str
    strict: bool = False
    """Refuse (400) instead of dropping parameters the provider does not support."""
    native: NativeRequest | None = None
    """The caller's request in this adapter's own format (`ProviderAdapter.native_format`): sent as written,
    and its answer returned as the provider wrote it."""


@dataclass
class UpstreamRequest:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    json: Any | None = None
    content: bytes | None = None
    dropped_params: list[str] = field(default_factory=list)
    """OpenAI parameters this provider cannot honour; returned to the caller in a response header."""


class StreamParser:
    """Turns a provider's stream events into OpenAI `chat.completion.chunk` dicts.

    The final usage, if the provider reports it, is emitted as a chunk with `choices: []`
    and `usage` set, exactly like OpenAI's `stream_options.include_usage`.

    `feed` and `finish` of every subclass raise only `GatewayError`: an event they cannot
    read is a retryable 502 (`response_fault`).
    """

    provider: str = "upstream"
    """Names the provider in error messages."""
    native: bool = False
    """Its chunks are the provider's own stream events, relayed unchanged; `usage` holds their usage."""
    usage: dict[str, Any] | None = None
    """A native stream's usage in OpenAI's shape, complete once the stream is."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _guard_methods(cls, ("feed", "finish"), response_fault, lambda parser: parser.provider)

    def feed(self, event: ServerEvent) -> list[dict[str, Any]]:
        raise NotImplementedError

    def finish(self) -> list[dict[str, Any]]:
        """Called once when the upstream stream ends cleanly; may flush a last chunk."""
        return []

    @property
    def done(self) -> bool:
        """True once the provider said the stream is complete (used to spot a stream cut halfway)."""
        return True


class ProviderAdapter:
    """Translate request, (the worker calls), parse response, parse stream chunk, map error.

    In every subclass, the request methods raise only `GatewayError`s (anything else becomes a
    400, `request_fault`) and the response methods too (anything else a retryable 502,
    `response_fault`).
    """

    name: str = ""
    native_format: str | None = None
    """The caller format (`NativeRequest.format`) this provider speaks: such a request is passed through."""
    REQUEST_METHODS = ("chat_request", "embeddings_request")
    RESPONSE_METHODS = ("parse_chat", "parse_embeddings", "stream_parser", "map_error", "usage_of")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _guard_methods(cls, cls.REQUEST_METHODS, request_fault, lambda adapter: adapter.name)
        _guard_methods(cls, cls.RESPONSE_METHODS, response_fault, lambda adapter: adapter.name)

    def chat_request(self, ctx: CallContext) -> UpstreamRequest:
        raise NotImplementedError

    def parse_chat(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        raise NotImplementedError

    def stream_parser(self, ctx: CallContext) -> StreamParser:
        raise NotImplementedError

    def embeddings_request(self, ctx: CallContext) -> UpstreamRequest:
        raise GatewayError(400, f"provider {self.name!r} does not support embeddings", param="model")

    def parse_embeddings(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        raise GatewayError(400, f"provider {self.name!r} does not support embeddings", param="model")

    def usage_of(self, response: dict[str, Any], ctx: CallContext) -> Usage:
        """The token usage of what `parse_chat` / `parse_embeddings` returned."""
        return usage_from_openai(response.get("usage"))

    def events(self, response: httpx.Response) -> AsyncIterator[ServerEvent]:
        """Decode the response body into events; SSE unless the provider frames differently."""
        return iter_sse(response)

    def map_error(self, status: int, body: bytes, headers: httpx.Headers) -> GatewayError:
        return openai_style_error(status, body, headers, provider=self.name)
