"""uvicorn's HTTP/1.1 protocol, with a response's head sent together with its body.

uvicorn writes a response's status line and headers as soon as the app sends `http.response.start`, and its
body on `http.response.body`: two `send` calls and two TCP segments for every JSON answer. A write to a local
socket costs tens of microseconds of CPU here (the kernel delivers it to the reader within the call), and
the two writes were an eighth of ingress's CPU under load (`bench/results/2026-12-02-profile-edge.md`).

Guarantees:
- A response's head is held until the end of the current turn of the event loop (`call_soon`), and whatever
  is written meanwhile joins it, so a head and a body sent without an await between them leave as one write.
  Nothing waits longer than that turn, and bytes leave in the order they were written.
- Every other write goes straight to the socket: a stream's frames, which arrive one reply at a time, pay
  nothing for the holding.
- `close()` sends what is held before closing; `abort()` drops it, as aborting does.
- Flow control is uvicorn's own: the real transport still pauses and resumes the protocol, and the bytes
  held here are counted in `get_write_buffer_size()`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD = b"HTTP/"
"""How every status line uvicorn writes begins."""


class CoalescingTransport(asyncio.Transport):
    """A transport that holds a response's head until the end of the event-loop turn, so its body joins it."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending:  # joins what is held, in order
            self._pending.append(bytes(data))
        elif data[:5] == HEAD:  # a status line: its body usually follows in this turn
            self._pending.append(bytes(data))
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

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
