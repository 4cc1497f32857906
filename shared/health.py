"""A tiny HTTP health endpoint for the services that have no HTTP server of their own.

GET /health answers 200 while the process runs (liveness); GET /ready answers 200 once the
service's Kafka clients are up and it has partitions to work on (readiness), else 503; GET /metrics
serves the process's Prometheus metrics (shared/metrics.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from switchyard.shared import metrics


async def serve_health(port: int, ready: Callable[[], bool], host: str = "0.0.0.0") -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = line.split(b" ")[1] if line.count(b" ") >= 2 else b"/"
            content_type = "application/json"
            if path.startswith(b"/metrics"):
                status, body, content_type = "200 OK", metrics.render(), metrics.CONTENT_TYPE
            elif path.startswith(b"/health"):
                status, body = "200 OK", b'{"status":"ok"}'
            elif path.startswith(b"/ready"):
                ok = ready()
                status, body = ("200 OK", b'{"ready":true}') if ok else ("503 Service Unavailable", b'{"ready":false}')
            else:
                status, body = "404 Not Found", b'{"error":"not found"}'
            head = f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
            writer.write(head.encode() + b"connection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
