"""The worker's HTTP client for provider calls keeps nothing from one call to the next but its connections."""

from __future__ import annotations

import asyncio

from switchyard.services.workers.providers.base import UpstreamRequest
from switchyard.services.workers.upstream import UpstreamClient


async def test_a_providers_cookies_never_reach_a_later_call() -> None:
    """A provider may set cookies (Cloudflare's `__cf_bm` on OpenAI's API). A later call, perhaps for another
    tenant's key, must carry only the headers its adapter built, so the client stores none."""
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head.lower())
        length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:"))
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nset-cookie: __cf_bm=tenant-a; Path=/\r\n"
                     b"content-length: 2\r\nconnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = f"http://localhost:{server.sockets[0].getsockname()[1]}/v1/chat/completions"  # a name: cookies apply
    try:
        async with UpstreamClient() as client:
            for _ in range(2):
                response = await client.send(UpstreamRequest(method="POST", url=url, json={"model": "m"}), 5.0)
                assert response.headers["set-cookie"].startswith("__cf_bm=")
                assert await response.aread() == b"{}"
                await response.aclose()
    finally:
        server.close()
    assert len(heads) == 2
    assert all(b"\r\ncookie:" not in head for head in heads)
