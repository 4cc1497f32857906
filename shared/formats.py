"""The pieces every translation between wire formats reads the same way: in ingress (Anthropic Messages,
token estimates, routing) and in the provider adapters alike.

- `content_text`: the text of an OpenAI message content, as the model reads it;
- `json_object`: tool-call arguments (OpenAI sends JSON text, other formats an object) as an object;
- `split_data_url` / `data_url`: base64 media inline in a `data:` URL, and back.

None of them raises: each returns what it found (or None), and the caller decides whether what is missing
is a 400 naming its parameter (a request) or something to keep as it is (a provider's answer).
"""

from __future__ import annotations

from typing import Any

import orjson


def content_text(content: Any) -> str:
    """The text of an OpenAI message content: the string itself, or the `text` of its `text` parts joined as
    one (parts of other types, and anything that is not text, count as nothing)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(p["text"] for p in content
                   if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))


def json_object(arguments: Any) -> dict[str, Any] | None:
    """Tool-call arguments as a JSON object: JSON text is decoded, an object kept, none at all (`None`, "") is
    `{}`; None when they are anything else (invalid JSON, or JSON that is not an object)."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or arguments == "":
        return {}
    if not isinstance(arguments, str | bytes):
        return None
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def split_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a `data:` URL, or None for any other URL."""
    if not url.startswith("data:"):
        return None
    header, _, data = url.partition(",")
    media_type = header[5:].split(";")[0] or "application/octet-stream"
    return media_type, data


def data_url(media_type: str, data: str) -> str:
    """A `data:` URL for base64 `data` of `media_type` (what `split_data_url` reads back)."""
    return f"data:{media_type};base64,{data}"
