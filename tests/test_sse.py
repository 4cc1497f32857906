"""Providers' server-sent events as the worker reads them (services/workers/upstream.py + providers/base.py
`iter_sse`, decoded by httpx-sse) from a real HTTP server that writes its body in awkward pieces: any line
ending, multi-line data, comments, a UTF-8 character split across reads; an answer that is not an event
stream is refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from httpx_sse import SSEError

from switchyard.services.workers.providers.base import ServerEvent, UpstreamRequest, iter_sse
from switchyard.services.workers.upstream import UpstreamClient


@asynccontextmanager
async def raw_server(pieces: list[bytes], content_type: str = "text/event-stream") -> AsyncIterator[str]:
    """An HTTP/1.1 server answering every request with `pieces`, each written and drained on its own."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\nconnection: close\r\n\r\n".encode())
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)  # each piece in its own read, as far as the loop allows
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        server.close()


async def events(pieces: list[bytes], content_type: str = "text/event-stream") -> list[ServerEvent]:
    async with raw_server(pieces, content_type) as url, UpstreamClient() as client:
        response = await client.send(UpstreamRequest(method="POST", url=url, headers={}, json={}), 5.0)
        try:
            return [event async for event in iter_sse(response)]  # type: ignore[arg-type]
        finally:
            await response.aclose()


async def test_events_across_line_endings_reads_and_a_split_character() -> None:
    euro = "€".encode()
    pieces = [b": keep-alive\r\n\r\n", b'data: {"a": 1}\r\n\r\n', b"event: delta\rdata: line one\r",
              b"data: line two\r\r", b"data: " + euro[:1], euro[1:] + b"\n\n", b"data: [DONE]\n\n"]
    got = await events(pieces)
    assert [(e.event, e.data) for e in got] == [
        (None, '{"a": 1}'), ("delta", "line one\nline two"), (None, "€"), (None, "[DONE]")]


async def test_an_event_cut_before_its_blank_line_is_dropped() -> None:
    """As the SSE rules say: an event the stream did not finish is discarded, never half-read; the stream then
    lacks its end, which the call reports as `stream_interrupted`."""
    got = await events([b'data: {"last": true}\n\n', b'data: {"cut": true}'])
    assert [e.data for e in got] == ['{"last": true}']


async def test_an_answer_that_is_not_an_event_stream_is_refused() -> None:
    with pytest.raises(SSEError):
        await events([b'{"choices": []}'], content_type="application/json")
