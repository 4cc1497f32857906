"""httpx's client interface over aiohttp's connection pool, for provider calls.

Why: httpx's own pool (httpcore on anyio) costs ~2.5 ms of CPU per request at 50 concurrent
calls on a 2-core machine (it re-checks every pooled connection's readability on each request),
while aiohttp's costs ~0.2 ms. Keeping httpx's `AsyncClient` in front leaves adapters, error
mapping and streaming (`aiter_lines`, `aread`) unchanged. Measured in bench/README.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
import yarl


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except aiohttp.ClientPayloadError as e:
            raise httpx.RemoteProtocolError(str(e)) from e
        except TimeoutError as e:
            raise httpx.ReadTimeout(str(e)) from e

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int = 512) -> None:
        self._limit = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:  # created lazily: it must belong to the running loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, limit_per_host=0, ttl_dns_cache=300),
                auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"))
        t = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(total=None, connect=t.get("connect"), sock_read=t.get("read"))
        try:
            # encoded=True: send the path exactly as built (aiohttp would re-quote it, and a re-quoted
            # path breaks signatures computed over it, e.g. Bedrock's SigV4 with `:` in model ids).
            response = await self._session.request(request.method, yarl.URL(str(request.url), encoded=True),
                                                   headers=request.headers.multi_items(),
                                                   data=await request.aread(), timeout=timeout,
                                                   allow_redirects=False)
        except (aiohttp.ServerTimeoutError, TimeoutError) as e:
            raise httpx.ReadTimeout(str(e), request=request) from e
        except aiohttp.ClientConnectionError as e:
            raise httpx.ConnectError(str(e), request=request) from e
        return httpx.Response(response.status, headers=response.raw_headers, stream=_Body(response),
                              request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
