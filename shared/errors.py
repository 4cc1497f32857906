"""OpenAI-style errors: one exception type that every layer raises and every edge renders."""

from __future__ import annotations

from typing import Any

from switchyard.shared.contracts import MAX_JSON_DEPTH, json_depth_exceeds

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

_DEFAULT_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


MAX_MESSAGE_CHARS = 32_768
"""An error message is cut to this (a provider's error body may echo a whole prompt): it stays cheap to redact."""


def redact_message(text: str) -> str:
    """`text` through the redaction policy (`logging.redact`, shared/redaction.py). Imported on first use:
    switchyard.shared.redaction depends on switchyard.shared.guardrails, which depends on this module."""
    from switchyard.shared.redaction import redact_text

    return redact_text(text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "…")


class GatewayError(Exception):
    """An error a client sees as `{"error": {"message", "type", "param", "code"}}` with `status`.

    `retryable` tells the router whether another attempt (same or next deployment) may help.

    The message and param are redacted when the error is made (redaction applies before every sink, error
    text included): whatever quotes a caller's input or a provider's echo of it (a model name
    that is a key, an upstream error repeating the prompt's email or card) reaches the client, the reply
    topic, the prompt log and the log lines with the policy's placeholders only. Every error a client sees
    is one of these, rebuilt from its wire form by `from_body` at each hop, so this is the one place.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retryable: bool | None = None,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = redact_message(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _DEFAULT_TYPES.get(status, "api_error")
        self.param = redact_message(param) if param else param
        self.code = code
        self.retryable = status in RETRYABLE_STATUSES if retryable is None else retryable
        self.retry_after_s = retry_after_s
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after_s is not None:
            headers["retry-after"] = str(max(1, round(self.retry_after_s)))
        return headers

    @classmethod
    def from_body(cls, status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None) -> GatewayError:
        """Rebuild an error from its wire form (a reply message or a provider's OpenAI-style body)."""
        err = (body or {}).get("error") or {}
        if not isinstance(err, dict):
            err = {"message": str(err)}
        headers = dict(headers or {})
        retry_after = headers.pop("retry-after", None)
        return cls(
            status,
            str(err.get("message") or "upstream error"),
            type=err.get("type"),
            param=err.get("param"),
            code=err.get("code"),
            retry_after_s=float(retry_after) if retry_after else None,
            headers=headers,
        )


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def timeout_error(message: str = "The request exceeded its deadline.") -> GatewayError:
    return GatewayError(504, message, code="timeout")


def too_deep(param: str | None) -> GatewayError:
    """The 400 for a body nested past MAX_JSON_DEPTH; `param` is the top-level field holding the nesting."""
    where = f" (in '{param}')" if param else ""
    return invalid_request(f"The request body is nested too deeply{where}: objects and arrays may nest at most "
                           f"{MAX_JSON_DEPTH} levels.", param=param, code="nesting_too_deep")


def nesting_error(body: dict[str, Any]) -> GatewayError | None:
    """`too_deep` for a body nested past MAX_JSON_DEPTH, naming the field that is; None for one that is not.
    Ingress answers it before accepting a body, the router before routing a batch producer's envelope."""
    if not json_depth_exceeds(body):
        return None
    return too_deep(next((k for k, v in body.items() if json_depth_exceeds(v, MAX_JSON_DEPTH - 1)), None))
