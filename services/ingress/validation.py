"""Request bodies as callers send them: validated by pydantic, errors that name the offending parameter.

Unknown fields are allowed and forwarded (providers keep adding parameters); known fields
are checked for type and range so bad input costs nothing downstream. Numbers and booleans are strict, as
OpenAI's are: `"1.5"` for `temperature` or `"yes"` for `stream` is a 400, never forwarded as a string.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import orjson
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from switchyard.shared.errors import GatewayError, invalid_request, nesting_error, too_deep

MAX_BODY_BYTES = int(os.environ.get("SWITCHYARD_MAX_BODY_BYTES", str(8 << 20)))


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _parts_have_type(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                if "type" not in part:
                    raise ValueError("each content part needs a `type`")
        return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = Field(default=False, strict=True)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    top_p: float | None = Field(default=None, ge=0, le=1, strict=True)
    n: int | None = Field(default=None, ge=1, le=128, strict=True)
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, strict=True)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, strict=True)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, strict=True)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    fallbacks: list[str] | None = None
    metadata: dict[str, Any] | None = None


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, strict=True)
    user: str | None = None


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or part == "str":
            continue  # pydantic's name for a union member, not a parameter
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object no deeper than MAX_JSON_DEPTH, or a 400 that says what is wrong.

    The depth is checked here, before any validation or translation, because every body ingress
    accepts must also be readable by the router and the workers (see MAX_JSON_DEPTH).
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        if e.msg.startswith("depth limit"):  # orjson's own limit (1024), far past ours
            raise too_deep(None) from None
        raise invalid_request(f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid_request("The request body must be a JSON object.", code="invalid_json")
    error = nesting_error(data)
    if error is not None:
        raise error
    return data


def validate(model: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    """Validate a body; the first problem becomes a 400 that names its parameter, like OpenAI does."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(tuple(err["loc"]))
        kind = err["type"]
        if kind == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {err['msg']}."
        raise GatewayError(400, message, param=param or None, code="missing_required_parameter"
                           if kind == "missing" else "invalid_value") from None


async def read_json(request: Request) -> dict[str, Any]:
    """The one way a route reads its JSON body: size-limited (`read_body`), then `parse_json`."""
    return parse_json(await read_body(request))


async def read_body(request: Request) -> bytes:
    """The raw body, refused with a 413 past MAX_BODY_BYTES (by Content-Length, or while it streams in)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise GatewayError(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes).", code="body_too_large")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise GatewayError(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes).",
                               code="body_too_large")
        chunks.append(part)
    return b"".join(chunks)
