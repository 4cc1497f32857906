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
- no redirect is followed, no body is decompressed or re-encoded.
"""

from __future__ import annotations

import codecs
import re
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

    async def send(self, up: UpstreamRequest, first_byte_timeout_s: float) -> Answer: ...


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
        async for chunk in self._response.content.iter_any():
            yield chunk

    async def aiter_text(self) -> AsyncIterator[str]:
        """The body as UTF-8 text, decoded incrementally (a character split across reads is kept whole)."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        async for chunk in self._response.content.iter_any():
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


class UpstreamClient:
    """One pooled aiohttp session per worker process, created on first use (it must belong to the running loop)."""

    def __init__(self, max_connections: int = 512) -> None:
        self._limit = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _pool(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, limit_per_host=0, ttl_dns_cache=300),
                auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                read_bufsize=READ_BUFFER_BYTES)
        return self._session

    async def send(self, up: UpstreamRequest, first_byte_timeout_s: float) -> UpstreamResponse:
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
        response = await self._pool().request(up.method, yarl.URL(url, encoded=True), headers=headers,
                                              data=content, timeout=timeout, allow_redirects=False)
        return UpstreamResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | Any) -> None:
        await self.aclose()
