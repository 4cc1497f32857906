"""Providers' server-sent events as the worker reads them (services/workers/upstream.py + providers/base.py
`iter_sse`, providers/sse.py) from a real HTTP server that writes its body in awkward pieces: any line
ending, multi-line data, comments, a UTF-8 character split across reads; an answer that is not an event
stream is refused."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from switchyard.services.workers.providers import sse
from switchyard.services.workers.providers.base import ServerEvent, UpstreamRequest, iter_sse
from switchyard.services.workers.upstream import STREAM_RECEIVE_WINDOW_BYTES, UpstreamClient
from switchyard.shared.errors import GatewayError


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
    with pytest.raises(GatewayError) as refused:
        await events([b'{"choices": []}'], content_type="application/json")
    assert refused.value.status == 502 and refused.value.code == "bad_upstream_response"


async def test_fields_as_the_rules_read_them_and_a_crlf_cut_between_reads_is_one_line_end() -> None:
    pieces = [b"data:no space\r", b"\ndata\r\n", b"event: message\nid: 7\nretry: 10\ndatabase: no\n",
              b"data:  two spaces\n\n", b"event: ping\n\n", b"\n\n", b"event\ndata: \xe2\x82\n\n"]
    got = await events(pieces)
    assert [(e.event, e.data) for e in got] == [(None, "no space\n\n two spaces"), (None, "\ufffd")]


def test_a_line_read_in_many_small_pieces_is_one_line() -> None:
    decoder = sse.SSEDecoder()
    line = b'data: {"text": "' + b"abcdefghij" * 1000 + b'"}\r'
    got = [event for start in range(0, len(line), 7) for event in decoder.feed(line[start:start + 7])]
    got += decoder.feed(b"\n\n")  # the CR LF cut by the read, then the blank line
    assert got == [ServerEvent(data='{"text": "' + "abcdefghij" * 1000 + '"}')]


async def test_an_event_past_the_limit_ends_the_call_with_a_502(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 64)
    for pieces in ([b"data: " + b"x" * 40 + b"\n", b"data: " + b"y" * 40 + b"\n\n"],  # one event, many lines
                   [b"data: " + b"x" * 40, b"x" * 40],  # one line, never ended
                   [b"data: 1\n" + b"x" * 80]):  # a long unfinished line after a complete one
        with pytest.raises(GatewayError) as refused:
            await events(pieces)
        assert refused.value.status == 502 and refused.value.code == "bad_upstream_response"


async def test_a_streaming_call_reads_through_a_small_receive_window_and_other_calls_do_not() -> None:
    """A stream the worker is slow to read waits in the provider's socket, not in the worker's memory."""

    async def open_ended(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        await reader.read()  # the body never ends: the connection is the client's until it closes it
        writer.close()

    server = await asyncio.start_server(open_ended, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
    windows = {}
    async with UpstreamClient() as client:
        for stream in (True, False):
            response = await client.send(UpstreamRequest(method="POST", url=url, headers={}, json={}), 5.0,
                                         stream=stream)
            connection = response._response.connection
            assert connection is not None and connection.transport is not None
            sock = connection.transport.get_extra_info("socket")
            windows[stream] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            await response.aclose()
    server.close()
    assert windows[True] <= 2 * STREAM_RECEIVE_WINDOW_BYTES  # Linux doubles what is asked for
    assert windows[False] > 2 * STREAM_RECEIVE_WINDOW_BYTES
