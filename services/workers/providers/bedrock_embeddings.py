"""Amazon Bedrock embeddings through `invoke`, by model id.

Embeddings by model id: Titan (`amazon.titan-embed-*`) takes one text per call, so a list of more
than one input is a 400 naming `input` (use a Cohere model for batches); Cohere
(`cohere.embed-*`) takes lists. Titan reports `inputTextTokenCount`; Cohere's body has no token
count, so its usage is an estimate (about one token per 4 characters).
"""

from __future__ import annotations

from typing import Any

from switchyard.services.workers.providers.base import (
    GATEWAY_FIELDS,
    CallContext,
)
from switchyard.services.workers.providers.bedrock_wire import SERVICE
from switchyard.services.workers.providers.openai_shape import float32_base64
from switchyard.services.workers.providers.reading import invalid, unsupported
from switchyard.shared.errors import GatewayError


def _embed_family(model: str) -> str | None:
    name = model.lower()
    if "titan-embed" in name:
        return "titan"
    if "cohere.embed" in name:
        return "cohere"
    return None


def _estimate_tokens(texts: list[str]) -> int:
    return sum(max(1, (len(t) + 3) // 4) for t in texts)


def embeddings_body(ctx: CallContext) -> tuple[dict[str, Any], list[str]]:
    """The invoke body for an OpenAI embeddings body (Titan or Cohere, by model id), and the parameters dropped."""
    body = ctx.body
    family = _embed_family(ctx.deployment.model)
    if family is None:
        raise invalid(SERVICE, f"model {ctx.deployment.model!r} is not a supported embeddings model "
                      "(amazon.titan-embed-* or cohere.embed-*)", "model")
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else list(raw or []) if isinstance(raw, list) else []
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise invalid(SERVICE, "embeddings take text input only (a non-empty string or a list of them)", "input")
    handled = {"model", "input", "encoding_format", "dimensions", "user", "metadata", *GATEWAY_FIELDS}
    out: dict[str, Any]
    if family == "titan":
        if len(texts) != 1:
            raise invalid(SERVICE, f"Titan embeddings take one input per request, got {len(texts)}; send one "
                          "string, or use a Cohere embed model for lists", "input")
        out = {"inputText": texts[0]}
        native: tuple[str, ...] = ("normalize",)
        if body.get("dimensions") is not None:
            out["dimensions"] = body["dimensions"]
    else:
        out = {"texts": texts, "input_type": body.get("input_type") or "search_document"}
        native = ("input_type", "truncate")
        if body.get("dimensions") is not None:
            out["output_dimension"] = body["dimensions"]
    for name in native:
        if body.get(name) is not None:
            out[name] = body[name]
    dropped = unsupported(ctx, [k for k, v in body.items() if k not in handled and k not in native
                                and v is not None], SERVICE)
    return out, dropped


def openai_embeddings(data: Any, ctx: CallContext) -> dict[str, Any]:
    """An invoke answer (Titan or Cohere) as an OpenAI embeddings list."""
    if not isinstance(data, dict):
        raise GatewayError(502, "bedrock: malformed embeddings response", code="bad_upstream_response",
                           retryable=True)
    raw = ctx.body.get("input")
    texts = [raw] if isinstance(raw, str) else [str(t) for t in raw or []]
    vectors: Any
    if isinstance(data.get("embedding"), list):  # Titan
        vectors = [data["embedding"]]
        tokens = int(data.get("inputTextTokenCount") or 0)
    else:  # Cohere: a list of vectors, or {"float": [...]} when embedding_types was given
        embeddings = data.get("embeddings")
        vectors = embeddings.get("float") if isinstance(embeddings, dict) else embeddings
        tokens = _estimate_tokens(texts)
    if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
        raise GatewayError(502, "bedrock: malformed embeddings response", code="bad_upstream_response",
                           retryable=True)
    as_base64 = ctx.body.get("encoding_format") == "base64"
    items = [{"object": "embedding", "index": i, "embedding": float32_base64(v) if as_base64 else v}
             for i, v in enumerate(vectors)]
    return {"object": "list", "data": items, "model": ctx.deployment.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
