"""What every fake provider shares: a real HTTP server on a free loopback port, request recording,
and fault injection on demand.

A fault is chosen per request, first from the `x-fake-fault` request header (JSON), else from
the queue filled by `fake.inject(...)` (or `POST /_fake/faults`). Faults:
  {"status": 503}                        answer that status with the provider's own error body
  {"status": 429, "retry_after": 2}      ...plus a Retry-After header
  {"latency_ms": 300}                    wait before answering (combines with others)
  {"chunk_latency_ms": 200}              wait before each stream event (a slow stream)
  {"malformed": true}                    200 with a body that is not JSON
  {"cut_after": 2}                       a stream that stops after 2 events, without its end marker
  {"silent": true}                       accept the request and never send a byte
  {"message": "..."}                     the error message to use (e.g. "context length exceeded")
  {"times": 3}                           a queued fault repeats for that many requests

A client that goes away before its answer is complete (during `latency_ms`, or mid-stream) is recorded in
`disconnects`; `wait_for_disconnect` blocks until one is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

from switchyard.devstack.broker import free_port


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    query: dict[str, str] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)


@dataclass
class Fault:
    status: int | None = None
    retry_after: float | None = None
    latency_ms: float = 0.0
    chunk_latency_ms: float = 0.0
    malformed: bool = False
    cut_after: int | None = None
    silent: bool = False
    message: str | None = None
    times: int = 1

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Fault:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class FakeProvider:
    """Base class: subclasses add the provider's routes in `routes()` and its error body in `error_body()`."""

    name = "fake"

    def __init__(self) -> None:
        self.app = FastAPI()
        self.requests: list[Recorded] = []
        self.faults: deque[Fault] = deque()
        self.disconnects: list[Recorded] = []
        """Requests whose client closed the connection before the answer was complete."""
        self._disconnected = threading.Condition()
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._add_control_routes()
        self.routes()

    # ---- to override ----
    def routes(self) -> None:
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": "api_error", "code": None}}

    # ---- lifecycle ----
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self.port = free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
                                timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 10
        while not self._server.started:
            if time.time() > deadline:
                raise RuntimeError(f"fake {self.name} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server:
            self._server.should_exit = True
            self._server.force_exit = True  # don't wait for connections a `silent` fault holds open
        if self._thread:
            self._thread.join(timeout=5)

    # ---- faults and recording ----
    def inject(self, **fault: Any) -> None:
        with self._lock:
            self.faults.append(Fault.parse(fault))

    def reset(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()
        with self._disconnected:
            self.disconnects.clear()

    def client_went_away(self, recorded: Recorded) -> None:
        with self._disconnected:
            self.disconnects.append(recorded)
            self._disconnected.notify_all()

    def wait_for_disconnect(self, timeout_s: float = 30.0, count: int = 1) -> list[Recorded]:
        """Block until `count` clients went away mid-answer (or fail after `timeout_s`)."""
        with self._disconnected:
            if not self._disconnected.wait_for(lambda: len(self.disconnects) >= count, timeout_s):
                raise AssertionError(f"{self.name} fake: {len(self.disconnects)} of {count} clients went away")
            return list(self.disconnects)

    async def watched_latency(self, fault: Fault | None, request: Request, recorded: Recorded) -> Fault | None:
        """Apply a fault's latency watching the client: None (the disconnect recorded) if it went away meanwhile,
        else the fault without its latency (for `fault_response`)."""
        if fault is None or not fault.latency_ms:
            return fault
        if not await self.pause(fault.latency_ms / 1000.0, request, recorded):
            return None
        return dataclasses.replace(fault, latency_ms=0.0)

    async def pause(self, seconds: float, request: Request, recorded: Recorded) -> bool:
        """Sleep `seconds`, watching the client: False (and the disconnect recorded) if it went away meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.02))
            if await request.is_disconnected():
                self.client_went_away(recorded)
                return False
        return True

    def calls(self, path_contains: str = "") -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if path_contains in r.path]

    async def record(self, request: Request) -> Recorded:
        raw = await request.body()
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw
        rec = Recorded(request.method, request.url.path, {k.lower(): v for k, v in request.headers.items()}, body,
                       dict(request.query_params))
        with self._lock:
            self.requests.append(rec)
        return rec

    def take_fault(self, request: Request) -> Fault | None:
        header = request.headers.get("x-fake-fault")
        if header:
            return Fault.parse(orjson.loads(header))
        with self._lock:
            if not self.faults:
                return None
            fault = self.faults[0]
            fault.times -= 1
            if fault.times <= 0:
                self.faults.popleft()
            return fault

    async def fault_response(self, fault: Fault | None) -> Response | None:
        """Apply the parts of a fault that happen before any body: latency, silence, error status, bad JSON."""
        if fault is None:
            return None
        if fault.latency_ms:
            await asyncio.sleep(fault.latency_ms / 1000.0)
        if fault.silent:
            await asyncio.sleep(3600)
        if fault.status and fault.status >= 400:
            headers = {}
            if fault.retry_after is not None:
                headers["retry-after"] = str(fault.retry_after)
            message = fault.message or f"injected fault {fault.status}"
            return Response(orjson.dumps(self.error_body(fault.status, message)), status_code=fault.status,
                            headers=headers, media_type="application/json")
        if fault.malformed:
            return Response(b'{"choices": [ this is not json', media_type="application/json")
        return None

    def _add_control_routes(self) -> None:
        @self.app.post("/_fake/faults")
        async def add_faults(request: Request) -> dict[str, int]:
            data = orjson.loads(await request.body())
            for item in data if isinstance(data, list) else [data]:
                self.inject(**item)
            return {"queued": len(self.faults)}

        @self.app.get("/_fake/requests")
        async def list_requests() -> Response:
            with self._lock:
                rows = [r.__dict__ for r in self.requests]
            return Response(orjson.dumps(rows, default=str), media_type="application/json")

        @self.app.delete("/_fake/requests")
        async def clear() -> dict[str, bool]:
            self.reset()
            return {"ok": True}


def sse(data: Any, event: str | None = None) -> bytes:
    """One SSE frame; `data` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else orjson.dumps(data).decode()
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()
