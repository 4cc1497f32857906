"""A lean fake OpenAI chat-completions server for benchmarks: raw asyncio + httptools on uvloop.

Why not the project's FastAPI fakes: a benchmark's upstream must cost next to nothing, or the
targets' numbers measure the fake. This one parses HTTP/1.1 with httptools, answers from
pre-built byte templates, and serves many thousands of requests per second on one core, far
above any target's rate (`bench/run.py` measures that and prints it as the "fake direct" row).

- `POST .../chat/completions` non-streaming: an OpenAI `chat.completion` with usage.
- `"stream": true`: SSE, a role chunk, `--stream-chunks` content chunks `w0`, ` w1`, ... (so a
  client can check order and framing), a finish chunk, a usage chunk when
  `stream_options.include_usage`, then `[DONE]`; `--chunk-gap-ms` apart (first content chunk
  at once, so time-to-first-token is the target's overhead, not the fake's pacing). A body may set its own
  length: `fake_stream_chunks` (content chunks) and `fake_chunk_bytes` (filler added to each content chunk);
  gateways forward unknown fields, so bench/abuse.py asks for a few very long streams this way.
- anything else: 404 JSON.

Run: `python bench/fake_openai.py --port N` (prints `ready <port>` on stdout when listening).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from typing import Any, cast

import httptools
import orjson

_ids = itertools.count()


def expected_stream_text(chunks: int) -> str:
    """The content a client must reassemble from a streamed answer with `chunks` content chunks."""
    return "".join(("w0" if i == 0 else f" w{i}") for i in range(chunks))


class FakeOpenAI(asyncio.Protocol):
    """One client connection: keep-alive, sequential requests (no pipelining needed by any client here)."""

    stream_chunks = 16
    chunk_gap_s = 0.002

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.keep_alive = True

    # ---- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(400, b'{"error":{"message":"bad request"}}')
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    # ---- httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        path = self.url.split(b"?", 1)[0]
        if not path.endswith(b"/chat/completions"):
            self._write(404, b'{"error":{"message":"not found","type":"invalid_request_error"}}')
            return
        try:
            req: dict[str, Any] = orjson.loads(b"".join(self.body))
        except orjson.JSONDecodeError:
            self._write(400, b'{"error":{"message":"malformed JSON","type":"invalid_request_error"}}')
            return
        model = str(req.get("model", "fake"))
        rid = f"chatcmpl-fake{next(_ids)}"
        if req.get("stream"):
            include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
            chunks, pad = req.get("fake_stream_chunks"), req.get("fake_chunk_bytes")
            asyncio.ensure_future(self._stream(rid, model, include_usage,
                                               chunks if isinstance(chunks, int) and chunks > 0 else None,
                                               pad if isinstance(pad, int) and pad > 0 else 0))
        else:
            self._write(200, orjson.dumps(_completion(rid, model)))

    # ---- responses -----------------------------------------------------------------------------
    def _write(self, status: int, body: bytes) -> None:
        if self.transport is None:
            return
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
                % (status, reason, len(body), b"" if self.keep_alive else b"connection: close\r\n"))
        self.transport.write(head + body)
        if not self.keep_alive:
            self.transport.close()

    async def _stream(self, rid: str, model: str, include_usage: bool, chunks: int | None = None,
                      pad: int = 0) -> None:
        t = self.transport
        if t is None:
            return
        t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                b"transfer-encoding: chunked\r\n\r\n")
        created = int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "fp_fake"}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return _sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                              "logprobs": None}]})

        t.write(_http_chunk(chunk({"role": "assistant", "content": ""}) + chunk({"content": "w0"})))
        count, filler = chunks or self.stream_chunks, "." * min(pad, 1 << 20)
        for i in range(1, count):
            if self.chunk_gap_s > 0:
                await asyncio.sleep(self.chunk_gap_s)
            if self.transport is None:
                return
            t.write(_http_chunk(chunk({"content": f" w{i}{filler}"})))
        tail = chunk({}, "stop")
        if include_usage:
            tail += _sse({**base, "choices": [], "usage": _usage(count)})
        t.write(_http_chunk(tail + b"data: [DONE]\n\n") + b"0\r\n\r\n")
        if not self.keep_alive:
            t.close()


def _usage(completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": 12, "completion_tokens": completion_tokens, "total_tokens": 12 + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}


def _completion(rid: str, model: str) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fake provider.",
                                                 "refusal": None},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": _usage(7)}


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeOpenAI, host, port, backlog=4096, reuse_address=True)
    sock_port = server.sockets[0].getsockname()[1]
    print(f"ready {sock_port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed as `ready <port>`)")
    parser.add_argument("--stream-chunks", type=int, default=FakeOpenAI.stream_chunks)
    parser.add_argument("--chunk-gap-ms", type=float, default=FakeOpenAI.chunk_gap_s * 1000)
    args = parser.parse_args(argv)
    FakeOpenAI.stream_chunks = max(1, args.stream_chunks)
    FakeOpenAI.chunk_gap_s = max(0.0, args.chunk_gap_ms / 1000.0)
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port))
    except ImportError:  # pragma: no cover - uvloop is a project dependency; plain asyncio still works
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
