"""The request relay: one accepted request from submission to its last reply, as every API route shares it.

`Relay` guarantees, for each call it submits:
- **exactly one settlement** (`settle`): the reply registration is dropped, the admission (in-flight slot,
  parallel slot, budget hold) is given back and the token estimate corrected once, on every path: an answer,
  an error reply, the deadline, the client going away before or during its stream, the stream's end;
- **a cancel for work nobody will read**: a call settled before the pipeline sent its last message (the
  client went away, the deadline passed, the stream was cut) publishes a `CancelRequest` on `llm.cancel`, so
  the worker holding the provider call stops it. Publishing never blocks the response path;
- **a disconnect is noticed while waiting**: from submission a watcher reads the ASGI `receive` channel, so
  a client that leaves while its non-streaming answer is still being generated is seen at once (uvicorn does
  not cancel the handler for it), not when the answer finally comes. The watcher is never cancelled: once the
  response is complete, `receive` returns `http.disconnect` (the ASGI spec), so it ends by itself, and
  telling a settled call that its client is gone changes nothing. A cancelled watcher left a reference cycle
  per request (the CancelledError's traceback through four frames and the request's state), which only the
  cyclic garbage collector could free;
- **the deadline bounds every wait**: a deadline mid-stream ends the stream with a 504 error reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from switchyard.services.ingress.auth import Identity
from switchyard.services.ingress.guarding import RequestGuard
from switchyard.services.ingress.hardening import echo
from switchyard.services.ingress.replies import ClientGone, Pending
from switchyard.services.ingress.responses import LastPart, SettlingStream, json_response, safe_headers
from switchyard.shared import topics
from switchyard.shared.contracts import Reply, RequestEnvelope
from switchyard.shared.errors import GatewayError, timeout_error
from switchyard.shared.native import native_required, required_format

if TYPE_CHECKING:
    from switchyard.services.ingress.app import Admitted, Gateway

log = logging.getLogger("switchyard.ingress.relay")

REPLY_GRACE_S = 2.0
"""How long past the deadline ingress still waits for the pipeline's own timeout answer."""

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

Shape = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns an OpenAI-shaped answer (or stream chunk) into the shape a route answers in."""

Receive = Callable[[], Any]
"""An ASGI `receive` callable."""


def same(data: dict[str, Any]) -> dict[str, Any]:
    return data


@dataclass
class InFlight:
    """One accepted request between submission and its settlement."""

    envelope: RequestEnvelope
    identity: Identity
    estimate: Admitted
    pending: Pending = field(default_factory=Pending)
    settled: bool = False
    guard: RequestGuard = field(default_factory=lambda: RequestGuard([], False))
    provider_ms: float | None = None
    """Time spent in provider calls, from the final reply (metrics: the gateway's overhead is the rest)."""
    first_chunk_at: float | None = None
    """perf_counter() when a stream's first chunk arrived (metrics: time to first token)."""
    watcher: asyncio.Task[None] | None = None
    """Reads the client's `receive` channel until the response is complete (see `Relay.watch`)."""


def reply_headers(reply: Reply, request_id: str) -> dict[str, str]:
    """The response headers a reply carries (made safe for HTTP) plus the request id."""
    return {**safe_headers(reply.headers), topics.HEADER_REQUEST_ID: request_id}


def wait_s(envelope: RequestEnvelope) -> float:
    """How long to wait for the next reply: until the deadline, plus the pipeline's grace to answer it."""
    return (envelope.deadline_ms - time.time() * 1000) / 1000.0 + REPLY_GRACE_S


async def joined(frames: AsyncGenerator[bytes, None], pending: Pending) -> AsyncGenerator[bytes, None]:
    """`frames`, with those of replies that were already here when one was rendered joined into one write.

    A worker sends a stream's chunks a few to a Kafka message; written one by one, each chunk cost an ASGI
    `send` through every middleware and a socket write (a quarter of ingress CPU on a streaming load, by
    py-spy). A frame is held only while the next reply is already queued, so no chunk waits for one that has
    not arrived: time to first token and each chunk's latency are what they were.
    """
    held: list[bytes] = []
    try:
        async for frame in frames:
            held.append(frame)
            if not pending.ready or isinstance(frame, LastPart):
                write = b"".join(held)
                yield LastPart(write) if isinstance(frame, LastPart) else write
                held.clear()
        if held:
            yield b"".join(held)
    finally:
        await frames.aclose()  # at once, not when collected: the source's own `finally` settles the call


async def _watch(receive: Receive, pending: Pending) -> None:
    """Tell `pending` when the client disconnects; anything else `receive` yields (a body already read) is
    ignored."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception as e:  # a broken channel is a client that is gone
        log.debug("client channel failed", extra={"error": repr(e)[:200]})
    pending.client_gone()


class Relay:
    """The chat path's steps over one ingress `Gateway`: submit, first reply, the rest of a stream, settle."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def submit(self, request: Request, identity: Identity, body: dict[str, Any], model: str, kind: str,
                     stream: bool) -> InFlight:
        """Check the model and the key's right to it, apply the guardrails and the cache, admit and write the
        envelope. When it raises, nothing is held; when it returns, the call must be settled."""
        gateway = self.gateway
        if gateway.config.group(model) is None:
            raise GatewayError(404, f"The model '{echo(model)}' does not exist or you do not have access to it.",
                               param="model", code="model_not_found")
        if not identity.may_use(model):
            raise GatewayError(403, f"This key may not use the model '{echo(model)}'.", param="model",
                               code="model_not_allowed")
        for fallback in body.get("fallbacks") or []:
            if not identity.may_use(str(fallback)):
                raise GatewayError(403, f"This key may not use the fallback model '{echo(str(fallback))}'.",
                                   param="fallbacks", code="model_not_allowed")
        guard = gateway.guard(identity, model)
        state = request.state
        try:
            guard.check_request(body)  # masks in place, before the envelope exists; a block costs nothing
        except GatewayError:
            gateway.publish_record(guard.record(state.request_id, identity.key_id, model, kind, stream))
            raise
        state.model = model  # a configured model: a bounded metric label
        native = getattr(state, "native", None)
        if guard.input and native is not None and native.lossy is not None:
            raise native_required(native.lossy, native.format, "input guardrails, which read and mask the request "
                                  "in OpenAI's format, apply to it")
        envelope = RequestEnvelope(
            id=state.request_id, kind=kind, model=model, body=body, stream=stream,  # type: ignore[arg-type]
            reply_topic=topics.REPLIES, reply_partition=gateway.reply_partition,
            deadline_ms=gateway.deadline_ms(request), key_id=identity.key_id, metadata=identity.metadata,
            route_headers=gateway.route_headers(request), allowed_models=identity.allowed_models,
            guardrails=identity.guardrails,  # the worker applies their output stage on top of the model's
            native=None if guard.input else native,  # unmasked: not with input rails
        )
        # A key with guardrails of its own skips the cache: an entry holds an answer guarded for another key. So
        # does a request its OpenAI body does not fully express (Anthropic's own tools): that body is no key.
        cacheable = gateway.cache.enabled(model) and not identity.guardrails and required_format(envelope) is None
        cached = await gateway.cache.lookup(request.headers, identity, envelope) if cacheable else None
        estimate = await gateway.admit(request, identity, body)  # last: nothing after it may fail before submit
        call = InFlight(envelope, identity, estimate, guard=guard)
        state.call = call
        if cached is not None:
            state.extra_headers.update(cached.headers)
            if cached.pending is not None:  # a hit: answered from the cache, nothing goes to Kafka
                call.pending = cached.pending
                return call
        try:
            call.pending = await gateway.submit(envelope, getattr(state, "trace", None))
        except GatewayError:  # routing refused it, or the broker did: answered here, and logged like any answer
            gateway.finish(identity, estimate, None)
            gateway.publish_record(guard.record(envelope.id, identity.key_id, model, kind, stream))
            raise
        if cached is not None:
            call.pending = gateway.cache.recording(call.pending, cached)
        self.watch(call, request.receive)
        return call

    def watch(self, call: InFlight, receive: Receive) -> None:
        """Notice the client leaving from now on (the watcher ends with the response)."""
        if not call.settled and call.watcher is None:
            call.watcher = asyncio.get_running_loop().create_task(_watch(receive, call.pending))

    async def first(self, call: InFlight) -> Reply:
        """The first reply; an error reply, the deadline or the client leaving becomes a GatewayError before
        any byte is sent (the call settled)."""
        try:
            reply = await call.pending.next(wait_s(call.envelope))
        except TimeoutError:
            self.settle(call, None)
            raise timeout_error() from None
        except BaseException:  # the client went away (ClientGone), cancelled, shut down: settle all the same
            self.settle(call, None)
            raise
        if reply.type == "error":
            call.guard.note(reply)
            self.settle(call, None)
            raise GatewayError.from_body(reply.status, reply.data, reply.headers)
        if reply.type != "chunk":
            call.guard.answered(reply)  # the worker applied the output guardrails; this takes its decisions
            self.settle(call, reply)
        else:
            call.first_chunk_at = time.perf_counter()
        return reply

    async def rest(self, call: InFlight, first: Reply) -> AsyncIterator[Reply]:
        """A stream's replies from the first on; a deadline mid-stream ends it with a 504 error reply, a client
        that left ends it quietly. Settles when it ends, however it ends."""
        reply: Reply | None = first
        try:
            while reply is not None:
                call.guard.streamed(reply)  # the worker applied the output guardrails; this takes its decisions
                yield reply
                if reply.type != "chunk":
                    return
                try:
                    reply = await call.pending.next(wait_s(call.envelope))
                except TimeoutError:
                    reply = None
                    yield Reply(id=call.envelope.id, type="error", status=504, data=timeout_error().body())
                except ClientGone:
                    reply = None
        finally:
            self.settle(call, reply)

    def settle(self, call: InFlight, last: Reply | None) -> None:
        """The request is over: release its admission, correct the token estimate, log its prompt record, and
        cancel the provider call if the pipeline has not finished it. Once only."""
        if call.settled:
            return
        call.settled = True
        gateway = self.gateway
        gateway.replies.unregister(call.envelope.id)
        if not call.pending.done:
            gateway.publish_cancel(call.envelope.id)
        if last is not None:
            call.provider_ms = last.provider_ms
        usage = (last.usage or (last.data or {}).get("usage")) if last is not None else None
        gateway.finish(call.identity, call.estimate, int(usage.get("total_tokens") or 0) if usage else None)
        env = call.envelope
        gateway.publish_record(call.guard.record(env.id, env.key_id, env.model, env.kind, env.stream))

    def stream(self, call: InFlight, frames: AsyncGenerator[bytes, None], headers: dict[str, str]) -> SettlingStream:
        """The SSE response relaying a stream's `frames` (see `joined`); it settles the call however it ends."""
        return SettlingStream(joined(frames, call.pending), lambda: self.settle(call, None),
                              media_type="text/event-stream", headers={**headers, **SSE_HEADERS})

    async def sse(self, call: InFlight, first: Reply, shape_chunk: Shape = same) -> AsyncGenerator[bytes, None]:
        """A stream in OpenAI's SSE framing: each chunk (shaped), an error as its body, then `[DONE]`. What the
        stream's last message carries leaves with `[DONE]`, as the response's last part."""
        tail = b""
        async for reply in self.rest(call, first):
            if reply.type == "error":
                tail = b"data: " + orjson.dumps(reply.data) + b"\n\n"
            elif chunks := reply.pieces():
                frames = b"".join(b"data: " + orjson.dumps(shape_chunk(chunk)) + b"\n\n" for chunk in chunks)
                if reply.type != "chunk":
                    tail = frames
                else:
                    yield frames
        yield LastPart(tail + b"data: [DONE]\n\n")

    async def dispatch(self, request: Request, identity: Identity, body: dict[str, Any], model: str, kind: str,
                       stream: bool, shape: Shape = same, shape_chunk: Shape = same) -> Response:
        """Submit, then answer in OpenAI's shape (or another, through `shape` / `shape_chunk`)."""
        call = await self.submit(request, identity, body, model, kind, stream)
        first = await self.first(call)
        headers = reply_headers(first, call.envelope.id)
        if not stream:
            return json_response(shape(first.data or {}), first.status, headers)
        return self.stream(call, self.sse(call, first, shape_chunk), headers)
