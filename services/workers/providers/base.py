"""The one small interface every provider adapter implements, plus the helpers they share.

An adapter translates; it never does I/O. The worker (`services/workers/calls.py`) sends
what `chat_request` builds with its pooled httpx client, turns each decoded stream
event into OpenAI chunks with the adapter's `StreamParser`, and maps error bodies
with `map_error`. Everything an adapter returns is already in OpenAI's shape.

An adapter raises nothing but `GatewayError`: a request it cannot translate is a 400 that
names the parameter (read through the helpers under "reading a request body"), an upstream
answer it cannot read a retryable 502; any other exception is turned into one of those at the
adapter's boundary (`faults_as`, applied to every subclass by `__init_subclass__`), so one body
or one answer can never take down the worker running it.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from shared.config import Deployment
from shared.contracts import NativeRequest, Usage
from shared.errors import GatewayError

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


@contextmanager
def faults_as(fault: Fault, provider: str, passing: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Run a block that raises only `GatewayError` (or one of `passing`): any other `Exception` becomes `fault`.

    Only `Exception`s are converted: task cancellation and interpreter exit propagate untouched.
    """
    try:
        yield
    except Exception as e:
        if isinstance(e, (GatewayError, *passing)):
            raise
        raise fault(provider, e) from e


def _guard_methods(cls: type, names: tuple[str, ...], fault: Fault, provider: Callable[[Any], str]) -> None:
    """Wrap the methods `names` that `cls` itself defines in `faults_as(fault, ...)`."""
    for name in names:
        method = cls.__dict__.get(name)
        if callable(method):
            setattr(cls, name, _guarded(method, fault, provider))


def _guarded(method: Callable[..., Any], fault: Fault, provider: Callable[[Any], str]) -> Callable[..., Any]:
    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        with faults_as(fault, provider(self)):
            return method(self, *args, **kwargs)

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


@dataclass
class ServerEvent:
    """One decoded stream event: an SSE event (name + data) or one frame of another framing."""

    data: str
    event: str | None = None
    payload: dict[str, Any] | None = None
    """Already-decoded JSON for binary framings (Bedrock's event stream)."""

    def json(self) -> Any:
        return self.payload if self.payload is not None else orjson.loads(self.data)


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

    async def events(self, response: httpx.Response) -> AsyncIterator[ServerEvent]:
        """Decode the response body into events; SSE unless the provider frames differently."""
        async for event in iter_sse(response):
            yield event

    def map_error(self, status: int, body: bytes, headers: httpx.Headers) -> GatewayError:
        return openai_style_error(status, body, headers, provider=self.name)


# ---- shared helpers -------------------------------------------------------------------------


async def iter_sse(response: httpx.Response) -> AsyncIterator[ServerEvent]:
    """A minimal, spec-following SSE decoder (event/data fields, blank-line dispatch, comments skipped)."""
    event: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield ServerEvent(data="\n".join(data), event=event)
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:
        yield ServerEvent(data="\n".join(data), event=event)


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """Retry-After (seconds or HTTP date) or OpenAI's retry-after-ms, whichever the provider sent."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def error_message(body: bytes) -> tuple[str, dict[str, Any]]:
    """The human message and the parsed error object of a JSON error body (or the raw text)."""
    try:
        parsed = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")[:500] or "upstream error", {}
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    if not isinstance(parsed, dict):
        return str(parsed)[:500], {}
    err = parsed.get("error", parsed)
    if isinstance(err, str):
        return err, parsed
    if isinstance(err, dict):
        return str(err.get("message") or parsed.get("message") or "upstream error"), err
    return str(parsed.get("message") or "upstream error"), parsed


CONTEXT_MARKERS = ("context_length_exceeded", "context length", "maximum context", "too many tokens",
                   "prompt is too long", "input is too long", "exceeds the context")
FILTER_MARKERS = ("content_filter", "content_policy", "content management policy", "safety")


def classify_status(
    status: int, message: str, code: str | None, retry_after: float | None, provider: str, param: str | None = None
) -> GatewayError:
    """Map an upstream status (+ hints in the message) onto the status and code an OpenAI client expects."""
    text = f"{code or ''} {message}".lower()
    prefix = f"{provider}: " if provider else ""
    if status == 400 or status == 413 or status == 422:
        if any(m in text for m in CONTEXT_MARKERS):
            return GatewayError(400, prefix + message, code="context_length_exceeded", param=param or "messages")
        if any(m in text for m in FILTER_MARKERS):
            return GatewayError(400, prefix + message, code="content_filter", param=param)
        return GatewayError(400, prefix + message, code=code, param=param)
    if status == 401:
        return GatewayError(401, prefix + message, code=code or "invalid_api_key")
    if status == 403:
        return GatewayError(403, prefix + message, code=code)
    if status == 404:
        return GatewayError(404, prefix + message, code=code or "model_not_found")
    if status == 408 or status == 504:
        return GatewayError(504, prefix + message, code=code or "timeout", retryable=True)
    if status == 429:
        return GatewayError(429, prefix + message, code=code or "rate_limit_exceeded", retry_after_s=retry_after)
    if status in (503, 529):
        return GatewayError(503, prefix + message, code=code or "overloaded", retryable=True,
                            retry_after_s=retry_after)
    if status >= 500:
        return GatewayError(502, prefix + message, code=code or "upstream_error", retryable=True,
                            retry_after_s=retry_after)
    return GatewayError(status if 400 <= status < 600 else 502, prefix + message, code=code)


def openai_style_error(status: int, body: bytes, headers: httpx.Headers, provider: str = "") -> GatewayError:
    message, err = error_message(body)
    code = err.get("code") if isinstance(err.get("code"), str) else None
    param = err.get("param") if isinstance(err.get("param"), str) else None
    return classify_status(status, message, code, retry_after_seconds(headers), provider, param)


def usage_from_openai(usage: dict[str, Any] | None) -> Usage:
    if not usage:
        return Usage()
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


def openai_usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """Usage in OpenAI's shape, for adapters translating another provider's counts."""
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    usage["prompt_tokens_details"] = {"cached_tokens": cached}
    usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def chunk(ctx: CallContext, delta: dict[str, Any] | None = None, finish_reason: str | None = None,
          usage: dict[str, Any] | None = None, created: int | None = None) -> dict[str, Any]:
    """One OpenAI `chat.completion.chunk`; with `usage` and no delta it is the final usage chunk."""
    out: dict[str, Any] = {
        "id": completion_id(ctx.request_id),
        "object": "chat.completion.chunk",
        "created": created or int(time.time()),
        "model": ctx.deployment.model,
        "choices": [] if delta is None and finish_reason is None
        else [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def completion(ctx: CallContext, message: dict[str, Any], finish_reason: str | None,
               usage: dict[str, Any], created: int | None = None) -> dict[str, Any]:
    """One OpenAI `chat.completion` with a single choice."""
    return {
        "id": completion_id(ctx.request_id),
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": ctx.deployment.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage,
    }


def image_parts(content: Any) -> list[dict[str, Any]]:
    """The `image_url` parts of an OpenAI message content (empty for plain text)."""
    if not isinstance(content, list):
        return []
    return [p for p in content if isinstance(p, dict) and p.get("type") == "image_url"]


def split_data_url(url: str) -> tuple[str, str] | None:
    """(media_type, base64 data) of a `data:` URL, or None for a remote URL."""
    if not url.startswith("data:"):
        return None
    header, _, data = url.partition(",")
    media_type = header[5:].split(";")[0] or "application/octet-stream"
    return media_type, data


# ---- reading a request body ------------------------------------------------------------------
#
# Ingress checks the top level of a body, but what sits inside messages, tools, tool_choice and
# response_format are free-form objects, and batch envelopes reach workers unchecked. Translating
# adapters read those through the helpers below, which return the shape the adapter expects or
# raise a 400 naming the offending parameter, as OpenAI does.


def invalid(provider: str, message: str, param: str | None, code: str = "invalid_value") -> GatewayError:
    """The 400 for a body an adapter cannot translate: names the parameter, never retryable."""
    return GatewayError(400, f"{provider}: {message}", param=param, code=code, retryable=False)


def as_object(value: Any, param: str, provider: str, *, required: bool = False) -> dict[str, Any]:
    """`value` as a JSON object; an absent one (None) is empty unless `required`."""
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise invalid(provider, f"'{param}' must be an object", param)
    return value


def as_list(value: Any, param: str, provider: str) -> list[Any]:
    """`value` as a JSON array; an absent one (None) is empty."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(provider, f"'{param}' must be an array", param)
    return value


def as_text(value: Any, param: str, provider: str) -> str:
    """`value` as a string; an absent one (None) is empty."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise invalid(provider, f"'{param}' must be a string", param)
    return value


def objects(value: Any, param: str, provider: str) -> list[dict[str, Any]]:
    """A JSON array of objects (messages, tools, tool calls, content parts), every item checked."""
    return [as_object(item, f"{param}[{i}]", provider, required=True)
            for i, item in enumerate(as_list(value, param, provider))]


def name_of(value: Any, param: str, provider: str) -> str:
    """A function name: a non-empty string."""
    if not isinstance(value, str) or not value:
        raise invalid(provider, f"'{param}' must be a non-empty string", param)
    return value


def number(body: dict[str, Any], name: str, provider: str) -> float | None:
    """A numeric parameter as a finite float, or None when absent.

    Ingress validates these in pydantic's lax mode, which accepts numeric strings and booleans,
    and forwards the body as sent: "0.5" here means what 0.5 means.
    """
    value = body.get(name)
    if value is None:
        return None
    try:
        result = float(value) if isinstance(value, int | float | str) else math.nan
    except (ValueError, OverflowError):
        result = math.nan
    if not math.isfinite(result):
        raise invalid(provider, f"'{name}' must be a number", name)
    return result


def chat_messages(body: dict[str, Any], provider: str) -> list[dict[str, Any]]:
    """The body's `messages`, each an object."""
    return objects(body.get("messages"), "messages", provider)


def content_parts(content: Any, param: str, provider: str) -> list[dict[str, Any]]:
    """A message content that is not a plain string: an array of part objects."""
    if not isinstance(content, list):
        raise invalid(provider, f"'{param}' must be a string or an array of content parts", param)
    return objects(content, param, provider)


def part_text(part: dict[str, Any], param: str, provider: str) -> str:
    """The `text` of a content part (empty when absent)."""
    return as_text(part.get("text"), f"{param}.text", provider)


def text_of(content: Any, param: str, provider: str) -> str:
    """All text of an OpenAI message content, whether a string or a list of parts."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = content_parts(content, param, provider)
    return "".join(part_text(p, f"{param}[{j}]", provider) for j, p in enumerate(parts) if p.get("type") == "text")


def image_url(part: dict[str, Any], param: str, provider: str) -> str:
    """The URL of an `image_url` part, given as `{"url": ...}` or as the bare string (empty when absent)."""
    image = part.get("image_url")
    if isinstance(image, str):
        return image
    return as_text(as_object(image, f"{param}.image_url", provider).get("url"), f"{param}.image_url.url", provider)


def tool_call_function(call: Any, param: str, provider: str) -> dict[str, Any]:
    """The `function` of an assistant tool call, checked as `called_function` does."""
    call = as_object(call, param, provider, required=True)
    return called_function(call.get("function"), f"{param}.function", provider)


def called_function(fn: Any, param: str, provider: str) -> dict[str, Any]:
    """A called function (a tool call's `function`, or a legacy `function_call`): an object with a
    non-empty `name` and `arguments` that, when given, are a string (OpenAI's JSON text) or an object."""
    fn = as_object(fn, param, provider, required=True)
    name_of(fn.get("name"), f"{param}.name", provider)
    if not isinstance(fn.get("arguments"), str | dict | None):
        raise invalid(provider, f"'{param}.arguments' must be a JSON string", f"{param}.arguments")
    return fn


def tool_arguments(fn: dict[str, Any], param: str, provider: str) -> dict[str, Any]:
    """The arguments of a checked tool call function (`tool_call_function`) as a JSON object."""
    raw = fn.get("arguments") or "{}"
    try:
        args = orjson.loads(raw) if isinstance(raw, str) else raw
    except orjson.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise invalid(provider, "tool call arguments must be a JSON object", f"{param}.function.arguments")
    return args


def function_tool(tool: Any, param: str, provider: str) -> dict[str, Any] | None:
    """The `function` of a `type: "function"` tool definition, checked: a non-empty `name`, `parameters`
    an object and `description` a string when given. None for a tool of another type, which each
    adapter passes on or drops as its provider allows."""
    tool = as_object(tool, param, provider, required=True)
    if tool.get("type") != "function":
        return None
    fn = as_object(tool.get("function"), f"{param}.function", provider, required=True)
    name_of(fn.get("name"), f"{param}.function.name", provider)
    as_object(fn.get("parameters"), f"{param}.function.parameters", provider)
    as_text(fn.get("description"), f"{param}.function.description", provider)
    return fn


def forced_function(choice: Any, provider: str) -> str | None:
    """The function name a `{"type": "function", "function": {"name": ...}}` tool_choice forces; None for
    any other choice (a string, or another type, which each adapter judges itself)."""
    if not isinstance(choice, dict) or choice.get("type") != "function":
        return None
    fn = as_object(choice.get("function"), "tool_choice.function", provider, required=True)
    return name_of(fn.get("name"), "tool_choice.function.name", provider)


@dataclass(frozen=True)
class ResponseFormat:
    """A checked `response_format`: its type and, for `json_schema`, the schema's name and schema."""

    type: str | None = None
    name: str | None = None
    schema: dict[str, Any] | None = None


def response_format(body: dict[str, Any], provider: str) -> ResponseFormat:
    """The body's `response_format`, with `json_schema` an object and its `schema` an object when given."""
    rf = as_object(body.get("response_format"), "response_format", provider)
    kind = rf.get("type")
    if kind is not None and not isinstance(kind, str):
        raise invalid(provider, "'response_format.type' must be a string", "response_format.type")
    if kind != "json_schema":
        return ResponseFormat(kind)
    spec = as_object(rf.get("json_schema"), "response_format.json_schema", provider)
    name = as_text(spec.get("name"), "response_format.json_schema.name", provider)
    schema = as_object(spec.get("schema"), "response_format.json_schema.schema", provider)
    return ResponseFormat(kind, name or None, schema or None)


def stop_sequences(body: dict[str, Any], provider: str) -> list[str]:
    """The body's `stop` (a string or a list of them) as a list, empty sequences left out."""
    stop = body.get("stop")
    items = [stop] if isinstance(stop, str) else as_list(stop, "stop", provider)
    return [s for i, s in enumerate(items) if as_text(s, f"stop[{i}]", provider)]


def encode_json(out: Any, body: dict[str, Any], provider: str, at: str = "") -> bytes:
    """`out` as JSON; a value JSON cannot carry (an integer beyond 64 bits, nesting past orjson's limit),
    which a batch envelope can hold, is a 400 naming where it sits in `body` (the caller's body, or the
    part of it found at the parameter path `at`)."""
    try:
        return orjson.dumps(out)
    except orjson.JSONEncodeError as e:
        param = _unencodable(body, at) or next((_join(at, k) for k, v in body.items() if not _encodes(v)), at or None)
        raise invalid(provider, f"the request holds a value that cannot be sent as JSON ({e})", param) from None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _encodes(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def _unencodable(value: Any, path: str) -> str | None:
    """The path of the first integer in `value` outside JSON's 64-bit range, if any."""
    if isinstance(value, int) and not isinstance(value, bool):
        return path if not -(1 << 63) <= value < (1 << 64) else None
    if isinstance(value, dict):
        items: Iterator[tuple[str, Any]] = ((_join(path, k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for where, v in items if (found := _unencodable(v, where))), None)
