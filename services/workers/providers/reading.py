"""Reading an OpenAI request body in a translating adapter: every nested shape checked, every refusal a
400 that names the parameter, as OpenAI does.

Ingress checks the top level of a body, but what sits inside messages, tools, tool_choice and
response_format are free-form objects, and batch envelopes reach workers unchecked. Translating adapters
read those through the helpers below, which return the shape the adapter expects or raise a 400 naming
the offending parameter. What a provider cannot honour is dropped and named (`unsupported`), or refused
when the call is strict.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from switchyard.shared.errors import GatewayError
from switchyard.shared.formats import content_text, json_object, split_data_url

if TYPE_CHECKING:
    from switchyard.services.workers.providers.base import CallContext


def image_parts(content: Any) -> list[dict[str, Any]]:
    """The `image_url` parts of an OpenAI message content (empty for plain text)."""
    if not isinstance(content, list):
        return []
    return [p for p in content if isinstance(p, dict) and p.get("type") == "image_url"]


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
    """All text of an OpenAI message content (`switchyard.shared.formats.content_text`), its parts checked first."""
    if content is not None and not isinstance(content, str):
        for j, part in enumerate(content_parts(content, param, provider)):
            if part.get("type") == "text":
                part_text(part, f"{param}[{j}]", provider)
    return content_text(content)


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
    called: dict[str, Any] = fn
    return called


def tool_arguments(fn: dict[str, Any], param: str, provider: str) -> dict[str, Any]:
    """The arguments of a checked tool call function (`tool_call_function`) as a JSON object."""
    args = json_object(fn.get("arguments"))
    if args is None:
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


def unsupported(ctx: CallContext, dropped: list[str], provider: str) -> list[str]:
    """`dropped`, the parameters this provider cannot honour, to be named in `dropped_params`; a strict call
    (`"strict": true`) is refused instead with a 400 naming the first of them."""
    if ctx.strict and dropped:
        raise invalid(provider, f"parameter {dropped[0]!r} is not supported by this provider", dropped[0],
                      code="unsupported_parameter")
    return dropped


def inline_media(url: str, param: str, provider: str, needs: str) -> tuple[str, str]:
    """(media type, base64 data) of a `data:` URL; any other URL is a 400 saying what the provider `needs`."""
    found = split_data_url(url)
    if found is None:
        raise invalid(provider, needs, param, code="unsupported_parameter")
    return found
