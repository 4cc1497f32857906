"""The OpenAPI document ingress serves at `GET /openapi.json`, for SDK generators and API fuzzers.

Routes read their bodies themselves (`validation.read_json`: size and depth limits, 400s that
name the parameter), so FastAPI cannot see what they take: each body-reading route declares its
body with `openapi_extra=json_body(...)`, naming the pydantic model that validates it or, for the
Anthropic routes (validated by hand in anthropic_api), a schema written here. `install` then puts
those schemas into the document's components, with the error shapes and the security schemes.

The document is public, as gateways usually serve it: it describes the API and holds no secrets.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from switchyard.shared.contracts import MAX_JSON_DEPTH

OPENAPI_URL = "/openapi.json"
_REF = "#/components/schemas/{model}"
_MODELS: dict[str, type[BaseModel]] = {}
"""Request body models named by `json_body`, put into the components by `install`."""

PUBLIC_PATHS = frozenset({"/health", "/ready"})
"""Operations that need no key (`security: []` in the document)."""

ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
"""Operations that answer errors in Anthropic's shape and also take the key as `x-api-key`."""

BEARER = {"bearerAuth": {"type": "http", "scheme": "bearer",
                         "description": "The master key or a virtual key (sk-sy-...)."}}
API_KEY = {"apiKeyAuth": {"type": "apiKey", "in": "header", "name": "x-api-key",
                          "description": "The same key, as the Anthropic SDKs send it."}}


def json_body(schema: type[BaseModel] | str, description: str | None = None) -> dict[str, Any]:
    """`openapi_extra` for a route that reads a JSON body itself: the body is `schema`, a pydantic model
    (registered for `install`) or the name of a schema in ANTHROPIC_SCHEMAS."""
    if isinstance(schema, str):
        name = schema
        if name not in ANTHROPIC_SCHEMAS:
            raise KeyError(f"no OpenAPI schema named {name!r}")
    else:
        name = schema.__name__
        _MODELS[name] = schema
    body: dict[str, Any] = {"required": True,
                            "content": {"application/json": {"schema": {"$ref": _REF.format(model=name)}}}}
    if description:
        body["description"] = description
    return {"requestBody": body}


def install(app: FastAPI) -> None:
    """Make `app.openapi()` (served at OPENAPI_URL) return `document(app)`, built once."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not cache:
            cache.update(document(app))
        return cache

    app.openapi = openapi  # type: ignore[method-assign]


def document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of `app`, completed with request bodies, errors and security."""
    doc = get_openapi(title=app.title, version=_version(), description=_DESCRIPTION, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)  # FastAPI's 422 shape: ingress answers 400 in OpenAI's shape instead
    schemas.update(_model_schemas())
    schemas.update(ANTHROPIC_SCHEMAS)
    schemas.update(ERROR_SCHEMAS)
    components["securitySchemes"] = {**BEARER, **API_KEY}
    doc["security"] = [{"bearerAuth": []}]
    for path, operations in doc.get("paths", {}).items():
        for operation in operations.values():
            _complete(path, operation)
    return doc


def _complete(path: str, operation: dict[str, Any]) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    error = "AnthropicError" if path in ANTHROPIC_PATHS else "Error"
    responses["default"] = {"description": "An error",
                            "content": {"application/json": {"schema": {"$ref": _REF.format(model=error)}}}}
    if path in PUBLIC_PATHS:
        operation["security"] = []
    elif path in ANTHROPIC_PATHS:
        operation["security"] = [{"bearerAuth": []}, {"apiKeyAuth": []}]


def _model_schemas() -> dict[str, Any]:
    if not _MODELS:
        return {}
    _, top = models_json_schema([(model, "validation") for model in _MODELS.values()], ref_template=_REF)
    return dict(top.get("$defs", {}))


def _version() -> str:
    try:
        return version("switchyard")
    except PackageNotFoundError:
        return "0"


_DESCRIPTION = (
    "Switchyard: an OpenAI-compatible LLM gateway (and Anthropic Messages API). Request bodies are JSON "
    f"objects nested at most {MAX_JSON_DEPTH} levels deep; errors are OpenAI-style "
    "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}` (Anthropic's shape on /v1/messages)."
)

ERROR_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
        }},
    },
    "AnthropicError": {
        "type": "object", "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {"type": "object", "required": ["type", "message"],
                      "properties": {"type": {"type": "string"}, "message": {"type": "string"}}},
            "request_id": {"type": "string"},
        },
    },
}

def _obj(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


_STR = {"type": "string", "minLength": 1}
_BASE64 = _obj(["type", "media_type", "data"], type={"const": "base64"}, media_type=_STR, data=_STR)
_TEXT_BLOCK = _obj(["type", "text"], type={"const": "text"}, text={"type": "string"})
_IMAGE_BLOCK = _obj(["type", "source"], type={"const": "image"},
                    source={"anyOf": [_BASE64, _obj(["type", "url"], type={"const": "url"}, url=_STR)]})
_DOCUMENT_BLOCK = _obj(["type", "source"], type={"const": "document"}, title={"type": "string"},
                       source={"anyOf": [_BASE64, _obj(["type", "data"], type={"const": "text"},
                                                       data={"type": "string"})]})
_TOOL_USE_BLOCK = _obj(["type", "id", "name", "input"], type={"const": "tool_use"}, id=_STR, name=_STR,
                       input={"type": "object"})
_TOOL_RESULT_BLOCK = _obj(
    ["type", "tool_use_id"], type={"const": "tool_result"}, tool_use_id=_STR, is_error={"type": "boolean"},
    content={"anyOf": [{"type": "string"},
                       {"type": "array", "items": {"anyOf": [_TEXT_BLOCK, _IMAGE_BLOCK, _DOCUMENT_BLOCK]}}]})


def _message(role: str, *blocks: dict[str, Any]) -> dict[str, Any]:
    return _obj(["role", "content"], role={"const": role},
                content={"anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": list(blocks)}}]})


_MESSAGE = {"anyOf": [_message("user", _TEXT_BLOCK, _IMAGE_BLOCK, _DOCUMENT_BLOCK, _TOOL_RESULT_BLOCK),
                      _message("assistant", _TEXT_BLOCK, _TOOL_USE_BLOCK)]}
_TOOL = _obj(["name", "input_schema"], type={"const": "custom"}, name=_STR, description={"type": "string"},
             input_schema={"type": "object"})
_TOOL_CHOICE = {"anyOf": [
    _obj(["type"], type={"enum": ["auto", "none"]}, disable_parallel_tool_use={"type": "boolean"}),
    _obj(["type"], type={"const": "any"}, disable_parallel_tool_use={"type": "boolean"}),
    _obj(["type", "name"], type={"const": "tool"}, name=_STR, disable_parallel_tool_use={"type": "boolean"}),
], "description": "'any' and 'tool' need 'tools'."}
_COUNT_TOKENS_PROPERTIES: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1},
    "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
    "system": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_BLOCK}]},
    "tools": {"type": "array", "items": _TOOL},
    "tool_choice": _TOOL_CHOICE,
}

ANTHROPIC_SCHEMAS: dict[str, Any] = {
    "AnthropicCountTokensRequest": {
        "type": "object", "required": ["model", "messages"], "properties": _COUNT_TOKENS_PROPERTIES,
        "description": "What /v1/messages/count_tokens reads (the answer is an estimate: characters / 4).",
    },
    "AnthropicMessagesRequest": {
        "type": "object", "required": ["model", "max_tokens", "messages"],
        "description": "An Anthropic Messages request, translated to chat and served by any provider.",
        "properties": {
            **_COUNT_TOKENS_PROPERTIES,
            "max_tokens": {"type": "integer", "minimum": 1},
            "stream": {"type": "boolean"},
            "temperature": {"type": "number", "minimum": 0, "maximum": 1},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "top_k": {"type": "integer", "minimum": 0},
            "stop_sequences": {"type": "array", "items": {"type": "string"}},
            "metadata": {"type": "object", "properties": {"user_id": {"type": "string"}}},
        },
    },
}
