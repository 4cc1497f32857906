"""Server-sent events, as providers stream them: decoded from the body's bytes by the WHATWG rules.

What the rules ask and this decoder does: a line ends with CR LF, LF or CR (a CR LF split across two reads
is one ending); `data` lines of one event are joined with LF; a line starting with `:` is a comment; a field
without a colon has an empty value and one space after the colon is dropped; an empty line ends an event,
which is sent only if it has data; an event the stream did not finish is dropped. `id` and `retry` are read
and ignored (a provider call is never resumed). Each line is decoded as UTF-8 on its own, once complete, so a
character split across reads stays whole; invalid bytes become U+FFFD.

Its own decoder rather than a library's, because a stream's events are the worker's hottest loop: one read
is one generator step and its events a plain list (httpx-sse took each event through three async generators).
A line or an event past MAX_EVENT_BYTES ends the call with a 502: a provider's stream cannot fill memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from switchyard.shared.errors import GatewayError

MAX_EVENT_BYTES = 16 << 20
"""The most one event (or one unfinished line) may hold: far past any chunk a provider streams."""


@dataclass(slots=True)
class ServerEvent:
    """One decoded stream event: an SSE event (name + data) or one frame of another framing."""

    data: str
    event: str | None = None
    payload: dict[str, Any] | None = None
    """Already-decoded JSON for binary framings (Bedrock's event stream)."""

    def json(self) -> Any:
        return self.payload if self.payload is not None else orjson.loads(self.data)


class SSEDecoder:
    """Bytes in, complete events out (`feed`); keeps the unfinished line and event between reads.

    An unfinished line is kept as the pieces it came in and joined once it ends, so a long line costs its length
    once, not once per read."""

    def __init__(self) -> None:
        self._tail: list[bytes] = []
        self._tail_size = 0
        self._after_cr = False
        self._data: list[str] = []
        self._size = 0
        self._event: str | None = None

    def feed(self, piece: bytes) -> list[ServerEvent]:
        if self._after_cr and piece.startswith(b"\n"):  # the LF of a CR LF cut by the read
            piece = piece[1:]
        self._after_cr = piece.endswith(b"\r")
        if b"\r" in piece:
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in piece:
            self._tail.append(piece)
            self._tail_size += len(piece)
            if self._tail_size > MAX_EVENT_BYTES:
                raise _too_large()
            return []
        if self._tail:
            piece = b"".join((*self._tail, piece))
        lines = piece.split(b"\n")
        last = lines.pop()
        self._tail, self._tail_size = ([last], len(last)) if last else ([], 0)
        if self._tail_size > MAX_EVENT_BYTES:
            raise _too_large()
        events: list[ServerEvent] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(ServerEvent("\n".join(self._data), self._event))
                self._data, self._size, self._event = [], 0, None
            elif line.startswith(b"data:"):
                value = line[6:] if line.startswith(b"data: ") else line[5:]
                self._size += len(value)
                if self._size > MAX_EVENT_BYTES:
                    raise _too_large()
                self._data.append(value.decode(errors="replace"))
            elif line.startswith(b"event:"):
                value = line[7:] if line.startswith(b"event: ") else line[6:]
                name = value.decode(errors="replace")
                self._event = name if name and name != "message" else None
            elif line == b"data":
                self._data.append("")
            # a comment (`:`), `id`, `retry`, `event` without a colon, an unknown field: nothing to keep
        return events


def _too_large() -> GatewayError:
    return GatewayError(502, f"upstream stream event larger than {MAX_EVENT_BYTES} bytes",
                        code="bad_upstream_response", retryable=True)


async def iter_sse(response: httpx.Response) -> AsyncIterator[ServerEvent]:
    """The answer's events; one that is not `text/event-stream` is a 502 `bad_upstream_response`."""
    content_type = response.headers.get("content-type", "")
    if "text/event-stream" not in content_type.partition(";")[0]:
        raise GatewayError(502, f"upstream answered a stream with content-type {content_type[:100]!r}, not "
                                "text/event-stream", code="bad_upstream_response", retryable=True)
    decoder = SSEDecoder()
    async for piece in response.aiter_bytes():
        for event in decoder.feed(piece):
            yield event
