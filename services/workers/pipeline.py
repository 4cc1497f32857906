"""One request message, from its envelope to the acknowledgements of everything it owes.

A message waits for its not-before time and a pacer slot, then its provider call is recorded on `llm.usage` before
it is made (acknowledged by the broker first), so a worker killed mid-call leaves a usage row "in doubt" rather than
a call nobody counted. The answer goes back as a reply (or a stream of chunk replies), guarded by the output
guardrails; a failed call goes back to the router as a retry envelope, unless chunks already reached the caller
(then the caller gets the error) or a 429 leaves another key (or, for batch work, time) to call again here. A call
whose client went away (`llm.cancel`) is recorded (499) and answers nobody.

`no_return` marks the current task as past the point of no return (its provider call has begun, or it is
delivering what its message owes): the consumer loop drains such tasks on a rebalance and cancels the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from switchyard.services.workers import observe
from switchyard.services.workers.calls import (
    CLIENT_CLOSED,
    UPSTREAM_AUTH_ERROR,
    CallFailed,
    Cancel,
    call,
    for_caller,
)
from switchyard.services.workers.cancels import Cancels
from switchyard.services.workers.chunks import ChunkStream
from switchyard.services.workers.guarding import OutputGuard
from switchyard.services.workers.outbox import Outbox, usage_chunk
from switchyard.services.workers.pacing import Lease, Pacer
from switchyard.services.workers.providers.base import CallContext, ProviderAdapter
from switchyard.services.workers.providers.native import native_request
from switchyard.services.workers.upstream import UpstreamClient
from switchyard.shared import topics
from switchyard.shared.answers import refuse_unreadable
from switchyard.shared.config_schema import Deployment, GatewayConfig
from switchyard.shared.contracts import ENVELOPE_VERSION, Reply, ReplyType, RequestEnvelope, now_ms
from switchyard.shared.errors import GatewayError, timeout_error
from switchyard.shared.guardrails import Guardrails

log = logging.getLogger("switchyard.worker")


class Pipeline:
    """Turns one message into its provider call(s) and returns the acknowledgements of what it owes."""

    def __init__(self, provider: str, adapter: ProviderAdapter, config: GatewayConfig, pacer: Pacer,
                 client: UpstreamClient, cancels: Cancels, outbox: Outbox,
                 no_return: Callable[[bool], None]) -> None:
        self.provider = provider
        self.adapter = adapter
        self.config = config
        self.guardrails = Guardrails(config.guardrails)
        self.pacer = pacer
        self.client = client
        self.cancels = cancels
        self.outbox = outbox
        self.no_return = no_return


    async def handle(self, raw: bytes) -> list[asyncio.Future[Any]]:
        try:
            env = RequestEnvelope.model_validate_json(raw)
        except ValidationError as e:  # never from a router: answered where it can be, else dead-lettered
            return [asyncio.ensure_future(refuse_unreadable(self.outbox.producer, raw, e, service=self.outbox.service))]
        if env.v > ENVELOPE_VERSION:  # routers upgrade with workers; a newer envelope may need what we lack
            return [await self.outbox.reply_error(env, GatewayError(500, f"envelope version {env.v} is newer than this "
                                                                   "worker", retryable=False))]
        dep = self.config.deployment(env.deployment or "")
        if dep is None:
            err = GatewayError(500, f"deployment {env.deployment!r} is not configured on this worker",
                               code="unknown_deployment", retryable=False)
            return [await self.outbox.reply_error(env, err)]
        if dep.credentials_missing:  # the operator's log names the variable (at start); the caller gets no detail
            err = GatewayError(502, f"The gateway could not authenticate with the provider of this model "
                               f"({self.provider}); the operator has been told.", code=UPSTREAM_AUTH_ERROR,
                               retryable=False)
            return [await self.outbox.reply_error(env, err)]
        with self.cancels.holding(env.id) as cancel:
            return await self._attempt(env, dep, cancel)

    async def _attempt(self, env: RequestEnvelope, dep: Deployment, cancel: Cancel) -> list[asyncio.Future[Any]]:
        """Wait for the request's time and a slot, then call (again, after a 429 another key can serve);
        a request whose client went away before its call began is dropped: nobody waits for its answer."""
        wait_s = (env.not_before_ms - now_ms()) / 1000.0
        if wait_s > 0:
            await asyncio.sleep(min(wait_s, max(0.0, (env.deadline_ms - now_ms()) / 1000.0)))
        if env.expired():
            return [await self.outbox.reply_error(env, timeout_error())]
        acks: list[asyncio.Future[Any]] = []
        call_seq = 0
        while True:
            if cancel.requested:
                log.info("dropping a request whose client went away before its call", extra={"request_id": env.id})
                return acks
            try:
                async with self.pacer.slot(dep, env) as lease:
                    self.no_return(True)
                    if env.expired():
                        return [*acks, await self.outbox.reply_error(env, timeout_error())]
                    done, retry_here = await self._call(env, dep, lease, call_seq, cancel)
                    acks.extend(done)
                    call_seq += 1
            except GatewayError as e:  # no slot before an interactive request's deadline: let the router decide
                return [*acks, self.outbox.retry(env, dep, e)]
            if not retry_here:
                return acks
            self.no_return(False)  # waiting for a key again: nothing in flight to lose

    async def _call(self, env: RequestEnvelope, dep: Deployment, lease: Lease,
                    call_seq: int, cancel: Cancel | None = None) -> tuple[list[asyncio.Future[Any]], bool]:
        """One provider call and everything it owes; True when the worker should call again itself
        (a 429 that paused one key while another key, or for batch, time, can still serve it)."""
        acks: list[asyncio.Future[Any]] = []
        route = f"group={env.model_group}; deployment={dep.id}; attempt={env.attempt}"
        ctx = CallContext(dep, env.body, env.stream, lease.key, env.id, strict=bool(env.body.get("strict")))
        started = Outbox.write_ahead(env, dep, call_seq)
        hop = observe.start_attempt(env, dep)

        def reply(kind: ReplyType, **fields: Any) -> Reply:
            return Reply(id=env.id, attempt=env.attempt, type=kind, custom_id=env.custom_id, call=started.event_id,
                         **fields)

        def send_chunks(chunks: list[dict[str, Any]], seq: int) -> asyncio.Future[Any]:
            return self.outbox.reply_later(env, reply("chunk", seq=seq, data=chunks[0], chunks=chunks[1:],
                                                      headers={topics.HEADER_ROUTE: route} if seq == 0 else {},
                                                      format=native_format))

        def blocked(err: GatewayError) -> None:  # an output guardrail ended the stream: the error goes at once
            acks.append(self.outbox.reply_later(env, reply("error", seq=stream.close(), status=err.status,
                                                           data=err.body(),
                                                           headers={topics.HEADER_ROUTE: route, **guard.headers()})))

        stream = ChunkStream(send_chunks)
        guard = OutputGuard.of(self.guardrails, env)  # nothing unmasked is produced to Kafka
        on_chunk = guard.guarded(stream.add, blocked)
        try:
            ctx.native = native_request(env, self.adapter, guarded=guard.active)  # sent as the caller wrote it
        except GatewayError as e:  # only its own format expresses the request, and this call cannot send it
            return [*acks, await self.outbox.reply_error(env, e)], False
        native_format = ctx.native.format if ctx.native is not None else None

        # Queued together, the start event (where routing asked for one) and the write-ahead record share one
        # produce request; only the write-ahead record must be acknowledged before the provider is called.
        if env.announce_start:
            acks.append(await self.outbox.started(env, dep))
        await self.outbox.store_write_ahead(started)
        remaining_s = (env.deadline_ms - now_ms()) / 1000.0
        try:
            result = await call(self.client, self.adapter, ctx, kind=env.kind, on_chunk=on_chunk,
                                total_timeout_s=remaining_s, cancel=cancel)
        except CallFailed as failed:
            seq = stream.close()
            acks.extend(stream.sent)
            observe.finish_attempt(hop, env, dep, None, failed)
            if failed.error.status == CLIENT_CLOSED:  # its client went away: the call is owed, no answer is
                acks.append(await self.outbox.usage(started, None, failed, env))
                acks.append(await self.outbox.event(env, dep, None, failed))
                return acks, False
            self.pacer.observe_failure(dep, lease, failed.error)
            acks.append(await self.outbox.usage(started, None, failed, env))
            acks.append(await self.outbox.event(env, dep, None, failed))
            failed.error = for_caller(failed.error, dep.provider, dep.id)
            if failed.chunks_sent == 0 and failed.error.status == 429 and (
                    env.priority == "batch" or self.pacer.any_key_free(dep)):
                return acks, True
            if failed.chunks_sent == 0:
                acks.append(self.outbox.retry(env, dep, failed.error, failed.latency_ms))
            elif guard.blocked is None:
                err = failed.error
                acks.append(await self.outbox.send_reply(env, reply("error", seq=seq, status=err.status,
                                                                    data=err.body())))
            return acks, False
        observe.finish_attempt(hop, env, dep, result, None)
        self.pacer.record_usage(lease, result.usage.prompt_tokens + result.usage.completion_tokens)
        provider_ms = result.latency_ms + sum(h.latency_ms for h in env.history)
        headers = {topics.HEADER_ROUTE: route}
        if result.dropped_params:
            headers[topics.HEADER_DROPPED_PARAMS] = ",".join(result.dropped_params)
        final_error = None
        try:
            if env.stream:
                tail = guard.close()  # text the window still held; the schema guardrails over the whole text
                if tail is not None:
                    await stream.add(tail)
            else:
                guard.answer(result.response)
        except GatewayError as e:
            final_error = e
        headers.update(guard.headers())
        if guard.blocked is not None or final_error is not None:
            if final_error is not None:
                acks.append(await self.outbox.send_reply(env, reply("error", seq=stream.close(),
                                                                    status=final_error.status, data=final_error.body(),
                                                                    headers=headers, provider_ms=provider_ms)))
            acks.extend(stream.sent)
        elif env.stream:
            if native_format is None and (env.body.get("stream_options") or {}).get("include_usage"):
                await on_chunk(usage_chunk(result, env))
            last_chunks, seq = stream.finish()
            end = reply("end", seq=seq, headers=headers, provider_ms=provider_ms, chunks=last_chunks,
                        format=native_format, data={"usage": usage_chunk(result, env)["usage"]})
            acks.extend(stream.sent)
            acks.append(await self.outbox.send_reply(env, end))
        else:
            usage = usage_chunk(result, env)["usage"] if native_format else None
            acks.append(await self.outbox.send_reply(env, reply("response", data=result.response, headers=headers,
                                                                provider_ms=provider_ms, format=native_format,
                                                                usage=usage)))
        acks.append(await self.outbox.usage(started, result, None, env))
        acks.append(await self.outbox.event(env, dep, result, None))
        return acks, False
