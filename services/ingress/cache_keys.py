"""What makes two requests the same request, whose entries a caller may see, and what the caller asked for.

- The **exact key** hashes the request kind, the model group and the whole body except what cannot change the
  answer (`stream`, `stream_options`, `user`, `metadata`): every generation parameter and the whole message
  list count, so a change of any of them is another key.
- The **semantic key** hashes the same with the text of the last user message left out (and the embedding
  model named in): entries that share it differ only in that text, and only they are compared by similarity.
  Requests that carry tools (or functions), ask for `n > 1`, or whose last user message is not plain text
  have no semantic key: they are answered exactly or not at all.
- The **scope** keeps tenants apart: a virtual key's entries serve only keys of the same team, or that key
  alone when it has no team; the master key has a scope of its own.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

from switchyard.services.ingress.auth import Identity
from switchyard.shared.errors import GatewayError

NOT_IN_KEY = frozenset({"stream", "stream_options", "user", "metadata"})
"""Body fields that never change an answer's content: a stream and a plain request share their entries."""

MAX_SEMANTIC_CHARS = 16_000
"""A last user message longer than this is matched exactly only (an embedding model would truncate it, and
two texts that differ only past the cut would look identical)."""

MAX_AGE_LIMIT_S = 10 * 365 * 86400


def scope(identity: Identity) -> str:
    """The tenant an entry belongs to: `master`, `team:<team>` or `key:<key id>`."""
    if identity.is_master:
        return "master"
    team = identity.metadata.get("team")
    return f"team:{team}" if team else f"key:{identity.key_id}"


def _digest(parts: list[Any]) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _keyed_body(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in NOT_IN_KEY}


def exact_key(kind: str, model: str, body: dict[str, Any]) -> str:
    return _digest(["exact", kind, model, _keyed_body(body)])


def _text_of(content: Any) -> str | None:
    """The text of a message's content: a string, or parts that are all text; else None (images, audio)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "\n".join(texts)  # type: ignore[arg-type]
    return None


def semantic_parts(kind: str, model: str, body: dict[str, Any], embedding_model: str) -> tuple[str, str] | None:
    """(semantic key, text of the last user message) where the request may be answered semantically, else None."""
    if kind != "chat" or body.get("tools") or body.get("functions"):
        return None
    n = body.get("n")
    if n is not None and n != 1:
        return None
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    last = next((i for i in range(len(messages) - 1, -1, -1)
                 if isinstance(messages[i], dict) and messages[i].get("role") == "user"), None)
    if last is None:
        return None
    text = _text_of(messages[last].get("content"))
    if text is None or not text.strip() or len(text) > MAX_SEMANTIC_CHARS:
        return None
    context = _keyed_body(body)
    context["messages"] = copy.copy(messages)
    context["messages"][last] = {**messages[last], "content": None}
    return _digest(["semantic", kind, model, embedding_model, context]), text


@dataclass(frozen=True)
class CacheControl:
    """The caller's `Cache-Control`: whether to look up, whether to store, the oldest entry acceptable."""

    lookup: bool = True
    store: bool = True
    max_age_s: float | None = None


_DIRECTIVE = re.compile(r"^\s*([A-Za-z-]+)\s*(?:=\s*\"?([^\"]*)\"?)?\s*$")


def cache_control(value: str | None) -> CacheControl:
    """Parse `Cache-Control`: `no-cache` skips the lookup but stores, `no-store` does neither, `max-age=N`
    accepts only entries younger than N seconds. Other directives are ignored; a malformed max-age is a 400."""
    if not value:
        return CacheControl()
    lookup, store, max_age = True, True, None
    for directive in value.split(","):
        m = _DIRECTIVE.match(directive)
        if not m:
            continue
        name, arg = m.group(1).lower(), m.group(2)
        if name == "no-cache":
            lookup = False
        elif name == "no-store":
            lookup = store = False
        elif name == "max-age":
            if arg is None or not re.fullmatch(r"[0-9]{1,15}", arg.strip()):
                raise GatewayError(400, "Cache-Control max-age must be a whole number of seconds.",
                                   param="cache-control", code="invalid_cache_control")
            max_age = float(min(int(arg.strip()), MAX_AGE_LIMIT_S))
    return CacheControl(lookup=lookup, store=store, max_age_s=max_age)
