"""The worker's HTTP client for provider calls: aiohttp's connection pool, used directly.

Why aiohttp: httpx's own pool (httpcore on anyio) cost ~2.5 ms of CPU per request at 50 concurrent calls
on a 2-core machine, aiohttp's ~0.2 ms (bench/README.md). Why directly: an httpx `AsyncClient` in front
of aiohttp built two request and two response objects per call (httpx's and aiohttp's) and re-wrapped
every body chunk; here an adapter's `UpstreamRequest` goes straight to aiohttp, and the answer comes back
as `UpstreamResponse`, a thin view of aiohttp's response with the few members adapters read
(`status_code`, `headers`, `aread`, `aiter_bytes`, `aiter_text`). Measured: bench/worker_call.py.

What it guarantees:
- the request path is sent exactly as the adapter built it (a re-quoted path breaks signatures computed
  over it, e.g. Bedrock's SigV4 with `:` in model ids);
- `aclose()` on a response that was not read to its end closes its connection (never returned to the
  pool half-read), so a call that is stopped (cancelled, timed out) is seen by the provider as a
  disconnect, and no later call reads the rest of its answer;
- no redirect is followed, no body is decompressed or re-encoded;
- no cookie is kept: a provider's `Set-Cookie` (Cloudflare's `__cf_bm` on OpenAI's API) never rides along on a
  later call, which may be another tenant's (and handling none is 6 % less CPU per call, bench/worker_call.py).
"""

from __future__ import annotations

import codecs
import re
import socket
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Protocol

import aiohttp
import httpx
import orjson
import yarl
from multidict import CIMultiDictProxy

from switchyard.services.workers.providers.base import UpstreamRequest

_UNSAFE = re.compile(r"[^A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]")
"""A character a URL may not carry as it is (a space, a non-ASCII letter): such a URL is percent-encoded first."""

TRANSPORT_ERRORS: tuple[type[Exception], ...] = (aiohttp.ClientError, OSError, TimeoutError)
"""Faults of the connection, not of what came over it (a refused connection, a stream cut, silence)."""


class Answer(Protocol):
    """What `call` reads of a provider's answer (and all that adapters read of it)."""

    status_code: int

    @property
    def headers(self) -> Any: ...  # a case-insensitive mapping with `get`

    async def aread(self) -> bytes: ...

    def aiter_bytes(self) -> AsyncIterator[bytes]: ...

    def aiter_text(self) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    """What `call` needs of a client: `UpstreamClient` in a worker."""

    async def send(self, up: UpstreamRequest, first_byte_timeout_s: float, stream: bool = False) -> Answer: ...


class UpstreamResponse:
    """A provider's answer as aiohttp received it (headers read, body not yet)."""

    __slots__ = ("_response", "status_code", "headers")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code: int = response.status
        self.headers: CIMultiDictProxy[str] = response.headers

    async def aread(self) -> bytes:
        return await self._response.read()

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body in pieces of at most READ_PIECE_BYTES (what one socket read brought in can be far more)."""
        async for chunk in self._response.content.iter_chunked(READ_PIECE_BYTES):
            yield chunk

    async def aiter_text(self) -> AsyncIterator[str]:
        """The body as UTF-8 text, decoded incrementally (a character split across reads is kept whole), in
        pieces of at most READ_PIECE_BYTES: a stream's decoders then hold one small piece's lines and events at
        a time, not everything one socket read brought in."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        async for chunk in self._response.content.iter_chunked(READ_PIECE_BYTES):
            text = decoder.decode(chunk)
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    async def aclose(self) -> None:
        """Done with this answer: read to its end, the connection goes back to the pool; else it is closed."""
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()


READ_BUFFER_BYTES = 16 << 10
"""How much of one answer aiohttp buffers before it stops reading the socket (it pauses at twice this): a
stream that waits for Kafka keeps its backlog in the kernel and the provider, not in this process, so the
worker's memory grows with its call slots, not with how far behind its streams are."""


READ_PIECE_BYTES = 4 << 10
"""The most of an answer handed on at once. Measured with 255 streams in flight behind a busy worker: reading
what aiohttp held in one piece (about 33 KB) kept 33 KB of bytes, 33 KB of text and 42 KB of split lines and
events alive per stream."""


STREAM_RECEIVE_WINDOW_BYTES = 16 << 10
"""SO_RCVBUF of the connections that carry streams (Linux doubles it for its own bookkeeping). aiohttp stops
reading an answer at twice READ_BUFFER_BYTES, but keeps what one socket read already brought in, up to all the
kernel held: a worker busier than its 512 streams held about 180 KB of each in aiohttp, 74 MB in all. With a
small window the provider holds that backlog instead: 1,000 slow readers peaked the worker at 182 MB, against
217 MB with the default window (bench/README.md, "Abuse figures"). A stream's tokens come at a few tens of KB/s,
inside 16 KiB per round trip even at 100 ms; other answers (a large embeddings reply) keep the default window,
on a pool of their own."""


def _stream_socket(addr_info: Any) -> socket.socket:
    """A socket for a streaming call's connection, with the small receive window set before it connects."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STREAM_RECEIVE_WINDOW_BYTES)
    return sock


class UpstreamClient:
    """Pooled aiohttp sessions of one worker process: one for streaming calls (STREAM_RECEIVE_WINDOW_BYTES), one
    for the rest, each created on first use (it must belong to the running loop)."""

    def __init__(self, max_connections: int = 512) -> None:
        self._limit = max_connections
        self._sessions: dict[bool, aiohttp.ClientSession] = {}

    def _pool(self, stream: bool) -> aiohttp.ClientSession:
        session = self._sessions.get(stream)
        if session is None:
            connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=0, ttl_dns_cache=300,
                                             socket_factory=_stream_socket if stream else None)
            session = self._sessions[stream] = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"), read_bufsize=READ_BUFFER_BYTES)
        return session

    async def send(self, up: UpstreamRequest, first_byte_timeout_s: float, stream: bool = False) -> UpstreamResponse:
        """Send `up`; returns once the status and headers arrived. Connecting, and each read, may take at
        most `first_byte_timeout_s` (connect at most 10 s); the caller bounds the whole call."""
        content: bytes | None = up.content
        headers: dict[str, str] = up.headers
        if up.json is not None:  # orjson: several times faster than the stdlib's json on a large body
            content = orjson.dumps(up.json)
            if not any(name.lower() == "content-type" for name in headers):
                headers = {"content-type": "application/json", **headers}
        timeout = aiohttp.ClientTimeout(total=None, connect=min(10.0, first_byte_timeout_s),
                                        sock_read=first_byte_timeout_s)
        url = str(httpx.URL(up.url)) if _UNSAFE.search(up.url) else up.url  # the rare URL that needs quoting
        response = await self._pool(stream).request(up.method, yarl.URL(url, encoded=True), headers=headers,
                                              data=content, timeout=timeout, allow_redirects=False)
        return UpstreamResponse(response)

    async def aclose(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | Any) -> None:
        await self.aclose()
