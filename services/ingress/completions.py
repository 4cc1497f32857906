"""The legacy `POST /v1/completions` API, mapped onto chat: the prompt becomes one user message,
and answers come back as `text_completion` objects (or chunks) in OpenAI's legacy shape.

Only what chat can honour is accepted: `echo`, `suffix`, `best_of` > 1 and `logprobs` are
refused with a 400 naming the parameter rather than silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from switchyard.shared.errors import GatewayError

_CHAT_FIELDS = ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
                "presence_penalty", "frequency_penalty", "seed", "user", "logit_bias", "metadata", "fallbacks")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    stream: bool = False
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


def to_chat(body: dict[str, Any], request: CompletionRequest) -> dict[str, Any]:
    for name, unsupported in (("echo", request.echo), ("suffix", request.suffix),
                              ("best_of", (request.best_of or 1) > 1), ("logprobs", request.logprobs)):
        if unsupported:
            raise GatewayError(400, f"'{name}' is not supported: /v1/completions is served by chat models.",
                               param=name, code="unsupported_parameter")
    prompt = request.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise GatewayError(400, "Send one prompt per request (batch several with `switchyard batch`).",
                               param="prompt", code="unsupported_parameter")
        prompt = prompt[0]
    chat = {k: body[k] for k in _CHAT_FIELDS if k in body}
    chat["max_tokens"] = request.max_tokens
    chat["messages"] = [{"role": "user", "content": prompt}]
    return chat


def _choice_text(choice: dict[str, Any]) -> str:
    message = choice.get("message") or choice.get("delta") or {}
    return str(message.get("content") or "")


def from_chat(completion: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(completion.get("id", "")).replace("chatcmpl-", "cmpl-", 1),
        "object": "text_completion",
        "created": completion.get("created"),
        "model": completion.get("model"),
        "choices": [{"text": _choice_text(c), "index": c.get("index", 0), "logprobs": None,
                     "finish_reason": c.get("finish_reason")} for c in completion.get("choices") or []],
        "usage": completion.get("usage"),
    }


def chunk_from_chat(chunk: dict[str, Any]) -> dict[str, Any]:
    out = from_chat(chunk)
    if out["usage"] is None:
        out.pop("usage")
    return out
