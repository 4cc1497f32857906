"""A cheap, conservative token estimate used before the provider reports the real count."""

from __future__ import annotations

from typing import Any

from switchyard.shared.formats import content_text

DEFAULT_OUTPUT_TOKENS = 256


text_of = content_text
"""The text of an OpenAI message content (shared/formats.py), as the router's content rules read it."""


def estimate_input_tokens(body: dict[str, Any]) -> int:
    """About one token per four characters of every message, tool schema and embedding input."""
    chars = sum(len(text_of(m.get("content"))) for m in body.get("messages") or [] if isinstance(m, dict))
    if body.get("tools"):
        chars += len(str(body["tools"]))
    if isinstance(body.get("input"), str | list):
        chars += len(str(body["input"]))
    return chars // 4 + 1


def estimate_total_tokens(body: dict[str, Any]) -> int:
    """Input estimate plus the most the completions may use (max_tokens, or a default, for each of `n`)."""
    out = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_OUTPUT_TOKENS
    n = body.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
    return estimate_input_tokens(body) + (int(out) * choices if "messages" in body else 0)
