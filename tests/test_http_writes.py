"""Ingress's coalescing of HTTP writes (services/ingress/http_writes.py): a response's head and what follows it in
the same event-loop turn reach the socket as one write, in order; other writes go straight through; nothing is
lost or delayed past that turn.

The transport below stands in for the socket only to count the writes; every other test of ingress goes
through the real protocol (a uvicorn server on a real socket), so a response it mangled would fail them.
"""

from __future__ import annotations

import asyncio

import httpx
import orjson

from switchyard.services.ingress.http_writes import CoalescingTransport
from tests.stack import RunningStack


class Socket(asyncio.Transport):
    """The writes a transport received, and whether it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


async def _next_turn() -> None:
    await asyncio.sleep(0)


def test_a_head_and_the_body_written_in_its_turn_leave_as_one_write() -> None:
    async def scenario() -> None:
        socket = Socket()
        transport = CoalescingTransport(socket, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"{}")
        assert socket.writes == [] and transport.get_write_buffer_size() == 40
        await _next_turn()
        assert socket.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        transport.write(b"data: 1\n\n")  # a stream's later frame is not held at all
        assert socket.writes[1:] == [b"data: 1\n\n"]

    asyncio.run(scenario())


def test_close_sends_what_is_pending_first_and_abort_drops_it() -> None:
    async def scenario() -> None:
        socket = Socket()
        transport = CoalescingTransport(socket, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        transport.close()
        assert socket.writes == [b"HTTP/1.1 204 No Content\r\n\r\n"] and socket.closed
        await _next_turn()  # the scheduled flush finds nothing left and writes nothing after the close
        assert len(socket.writes) == 1

        aborted = Socket()
        transport = CoalescingTransport(aborted, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"never sent")
        transport.abort()
        await _next_turn()
        assert aborted.writes == [] and aborted.closed

    asyncio.run(scenario())


def _streamed_text(sse: str) -> str:
    frames = [line.removeprefix("data: ") for line in sse.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]", frames[-3:]
    return "".join((c["choices"][0]["delta"].get("content") or "") for c in map(orjson.loads, frames[:-1])
                   if c.get("choices"))


def test_answers_through_the_coalescing_protocol_are_whole_on_a_kept_alive_connection(stack: RunningStack) -> None:
    """Plain and streamed answers, in turn, on one kept-alive connection: each parses whole and says the same,
    so no write was lost, split wrongly or reordered."""
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}]}
    with httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=60) as client:
        for _ in range(3):
            plain = client.post("/v1/chat/completions", json=body)
            assert plain.status_code == 200, plain.text
            text = plain.json()["choices"][0]["message"]["content"]
            assert "hello there" in text
            streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
            assert streamed.status_code == 200, streamed.text
            assert _streamed_text(streamed.text) == text
