"""Amazon Bedrock on the wire: its errors (`bedrock_error`) and the AWS binary event stream of ConverseStream.

Stream: frames of the event stream are decoded with both CRCs verified (a mismatch is a 502);
`messageStart` / `contentBlockStart` / `contentBlockDelta` / `messageStop` / `metadata` become
OpenAI chunks; tool calls get OpenAI indexes from 0 in the order they start. An `exception` frame
(`throttlingException`, ...) is mapped like the same HTTP error. The stream counts as complete only
after `messageStop` and `metadata` (Bedrock always sends the usage last); anything less is
`stream_interrupted`.
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import Any

import orjson

from switchyard.services.workers.providers.base import ServerEvent
from switchyard.services.workers.providers.openai_shape import classify_status
from switchyard.shared.errors import GatewayError

SERVICE = "bedrock"
EVENT_STREAM = "application/vnd.amazon.eventstream"
MAX_FRAME = 16 * 1024 * 1024  # AWS caps an event-stream message far below this; protects the buffer

# Bedrock error type (x-amzn-ErrorType, or an in-stream :exception-type) ->
# (the HTTP status the gateway answers with, OpenAI error code, retryable).
ERROR_TYPES: dict[str, tuple[int, str | None, bool]] = {
    "ValidationException": (400, None, False),
    "AccessDeniedException": (403, "permission_denied", False),
    "UnrecognizedClientException": (401, "invalid_api_key", False),
    "InvalidSignatureException": (401, "invalid_api_key", False),
    "IncompleteSignatureException": (401, "invalid_api_key", False),
    "MissingAuthenticationTokenException": (401, "invalid_api_key", False),
    "ExpiredTokenException": (401, "invalid_api_key", False),
    "ResourceNotFoundException": (404, "model_not_found", False),
    "ThrottlingException": (429, "rate_limit_exceeded", True),
    "ServiceQuotaExceededException": (429, "rate_limit_exceeded", True),
    "TooManyRequestsException": (429, "rate_limit_exceeded", True),
    "ModelNotReadyException": (503, "overloaded", True),
    "ModelTimeoutException": (504, "timeout", True),
    "InternalServerException": (502, "upstream_error", True),
    "InternalFailure": (502, "upstream_error", True),
    "ModelErrorException": (502, "upstream_error", True),
    "ModelStreamErrorException": (502, "upstream_error", True),
    "ServiceUnavailableException": (503, "overloaded", True),
    "ServiceUnavailable": (503, "overloaded", True),
}
# How Bedrock and the models behind it word an over-long prompt in a ValidationException: "Input is too
# long for requested model.", "prompt is too long: 210000 tokens > 200000 maximum", "Input tokens exceed the
# configured limit of 272000 tokens", "... exceeds the model's maximum context length ...".
_CONTEXT_RE = re.compile(r"too long|too many (input )?tokens|input tokens exceed|context (length|window)|"
                         r"maximum context", re.IGNORECASE)


def _error_type(raw: str | None) -> str:
    """`ValidationException` from `ValidationException:http://internal...`, a `__type` like
    `com.amazon.coral.validate#ValidationException`, or an in-stream `validationException`."""
    name = (raw or "").split(":")[0].split("#")[-1].strip()
    return name[:1].upper() + name[1:]


def bedrock_error(status: int | None, kind: str | None, message: str, retry_after: float | None = None) -> GatewayError:
    """Map a Bedrock error (its type first, the HTTP status when the type is unknown) to a GatewayError."""
    name = _error_type(kind)
    prefix = "bedrock: "
    known = ERROR_TYPES.get(name)
    if known is None:
        return classify_status(status or 502, message, None, retry_after, SERVICE)
    http, code, retryable = known
    if http == 400:
        if _CONTEXT_RE.search(message):
            return GatewayError(400, prefix + message, code="context_length_exceeded", param="messages")
        return GatewayError(400, prefix + message, code=code)
    return GatewayError(http, prefix + message, code=code, retryable=retryable,
                        retry_after_s=retry_after if http in (429, 503) else None)


# ---- event stream ----------------------------------------------------------------------------


def _frame_error(what: str) -> GatewayError:
    return GatewayError(502, f"bedrock: corrupt event stream ({what})", code="bad_upstream_response", retryable=True)


def _decode_headers(raw: bytes) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    pos = 0
    try:
        while pos < len(raw):
            name_len = raw[pos]
            name = raw[pos + 1:pos + 1 + name_len].decode("utf-8")
            pos += 1 + name_len
            kind = raw[pos]
            pos += 1
            value: Any
            if kind in (0, 1):
                value = kind == 0
            elif kind == 2:
                value = struct.unpack_from(">b", raw, pos)[0]
                pos += 1
            elif kind == 3:
                value = struct.unpack_from(">h", raw, pos)[0]
                pos += 2
            elif kind == 4:
                value = struct.unpack_from(">i", raw, pos)[0]
                pos += 4
            elif kind in (5, 8):
                value = struct.unpack_from(">q", raw, pos)[0]
                pos += 8
            elif kind in (6, 7):
                (length,) = struct.unpack_from(">H", raw, pos)
                data = raw[pos + 2:pos + 2 + length]
                if len(data) != length:
                    raise _frame_error("header value overruns the headers")
                value = data.decode("utf-8") if kind == 7 else data
                pos += 2 + length
            elif kind == 9:
                value = raw[pos:pos + 16]
                pos += 16
            else:
                raise _frame_error(f"unknown header type {kind}")
            headers[name] = value
    except (IndexError, struct.error, UnicodeDecodeError):
        raise _frame_error("malformed headers") from None
    if pos != len(raw):
        raise _frame_error("header value overruns the headers")
    return headers


class EventStreamDecoder:
    """Incremental decoder of `application/vnd.amazon.eventstream` frames:
    prelude (total length, headers length, prelude CRC32), headers, payload, message CRC32."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: GatewayError | None = None

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        """The whole frames `data` completes. A corrupt frame raises, but only after the frames before it
        (in the same read) were returned: it raises on the next `feed` (`feed(b"")` at the stream's end)."""
        if self._error is not None:
            raise self._error
        self._buf += data
        out: list[tuple[dict[str, Any], bytes]] = []
        try:
            self._frames(out)
        except GatewayError as e:
            if not out:
                raise
            self._error = e
        return out

    def _frames(self, out: list[tuple[dict[str, Any], bytes]]) -> None:
        while len(self._buf) >= 12:
            total, headers_len, prelude_crc = struct.unpack_from(">III", self._buf, 0)
            if zlib.crc32(self._buf[:8]) != prelude_crc:
                raise _frame_error("prelude checksum mismatch")
            if total < 16 or total > MAX_FRAME or headers_len > total - 16:
                raise _frame_error(f"impossible frame lengths {total}/{headers_len}")
            if len(self._buf) < total:
                break
            frame = bytes(self._buf[:total])
            del self._buf[:total]
            (message_crc,) = struct.unpack_from(">I", frame, total - 4)
            if zlib.crc32(frame[:-4]) != message_crc:
                raise _frame_error("message checksum mismatch")
            out.append((_decode_headers(frame[12:12 + headers_len]), frame[12 + headers_len:-4]))

    @property
    def pending(self) -> int:
        """Bytes of a frame begun but not finished."""
        return len(self._buf)


def _frame_event(headers: dict[str, Any], payload: bytes) -> ServerEvent | None:
    kind = headers.get(":message-type", "event")
    try:
        body = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError:
        if kind == "event":
            raise _frame_error("payload is not JSON") from None
        body = {"message": payload.decode("utf-8", "replace")[:500]}
    if kind == "exception":
        message = str((body.get("message") or body.get("Message")) if isinstance(body, dict) else body)
        raise bedrock_error(None, str(headers.get(":exception-type") or ""), message or "stream exception")
    if kind == "error":
        code = str(headers.get(":error-code") or "")
        raise bedrock_error(None, code, str(headers.get(":error-message") or code or "stream error"))
    if kind != "event" or not isinstance(body, dict):
        return None
    return ServerEvent(data="", event=str(headers.get(":event-type") or ""), payload=body)
