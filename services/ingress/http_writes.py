"""uvicorn's HTTP/1.1 protocol, with the writes of one event-loop turn sent as one.

uvicorn writes a response's status line and headers as soon as the app sends `http.response.start`, and its
body on `http.response.body`: two `send` calls and two TCP segments for every JSON answer. A write to a local
socket costs tens of microseconds of CPU here (the kernel delivers it to the reader within the call), and
the two writes were an eighth of ingress's CPU under load (`bench/results/2026-12-02-profile-edge.md`).

Guarantees:
- Bytes leave in the order they were written, once the current turn of the event loop ends (`call_soon`),
  so a head and a body sent without an await between them leave together; nothing waits longer than that.
- `close()` sends what is pending before closing; `abort()` drops it, as aborting does.
- Flow control is uvicorn's own: the real transport still pauses and resumes the protocol, and the bytes
  pending here are counted in `get_write_buffer_size()`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport(asyncio.Transport):
    """A transport whose writes within one event-loop turn reach the socket as one write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(data) for data in self._pending)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `CoalescingTransport` (`uvicorn.run(..., http=HttpProtocol)`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, asyncio.get_running_loop()))
