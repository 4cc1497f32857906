"""What one request message owes, produced to Kafka: its replies, its retry envelope, its usage and events.

Every method returns (or awaits) the broker's acknowledgement, so the consumer loop commits a message's offset
only after everything it owes is stored. Nothing here stops the process for one message: a response too large
for one message is sent in parts (shared/parts.py), one past SWITCHYARD_MAX_REPLY_BYTES, or a chunk the broker
refuses as too large, is answered with a 413 in its place; a reply whose topic or partition does not exist, and
usage or events the broker refuses, are dead-lettered (shared/dead.py), since no error could reach a caller there.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
import uuid
from collections import deque
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from switchyard.services.workers.calls import CallFailed, CallResult
from switchyard.shared import topics, tracing
from switchyard.shared.config_schema import Deployment
from switchyard.shared.contracts import (
    IN_DOUBT,
    OUT_OF_BAND,
    AttemptEvent,
    AttemptRecord,
    Reply,
    RequestEnvelope,
    UsageEvent,
    now_ms,
)
from switchyard.shared.dead import bury, send_or_bury
from switchyard.shared.errors import GatewayError
from switchyard.shared.kafka_delivery import Headers, deliver, encode, forward, queue_then, send_and_wait
from switchyard.shared.kafka_destinations import REFUSED_TOO_LARGE, DeliveryRefused, too_large
from switchyard.shared.parts import MAX_REPLY_BYTES, split

log = logging.getLogger("switchyard.worker")


class Outbox:
    """The worker's producer, as the messages a request owes."""

    def __init__(self, producer: AIOKafkaProducer, service: str) -> None:
        self.producer = producer
        self.service = service
        self._later: deque[tuple[RequestEnvelope, Reply, asyncio.Future[Any], Headers | None]] = deque()
        self._sending_later = False

    async def send_reply(self, env: RequestEnvelope, reply: Reply,
                         headers: Headers | None = None) -> asyncio.Future[Any]:
        """Queue a reply; the future of its delivery (`deliver_reply`'s outcome). `headers`: the trace
        context's, when not the running task's."""
        value = encode(reply)
        headers = headers or tracing.current_headers()
        if reply.type == "response" and len(value) >= topics.MAX_MESSAGE_BYTES:
            return asyncio.ensure_future(self.deliver_reply(env, reply, headers=headers))
        return await queue_then(lambda: self.deliver_reply(env, reply, headers=headers), self.producer,
                                env.reply_topic, value, key=env.id.encode(), partition=env.reply_partition,
                                headers=headers)

    def reply_later(self, env: RequestEnvelope, reply: Reply) -> asyncio.Future[Any]:
        """`send_reply` for a caller that cannot await (a stream's acknowledgement callback): the future of its
        delivery. Replies queued this way leave in order, through one task for all of them while any wait, not
        a task each: one produce response acknowledges the messages of many streams at once, and each
        acknowledgement sends that stream's next message."""
        outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._later.append((env, reply, outcome, tracing.current_headers()))
        if not self._sending_later:  # in a context of its own: each reply carries its own trace context
            self._sending_later = True
            asyncio.get_running_loop().create_task(self._send_later(), context=contextvars.Context())
        return outcome

    async def _send_later(self) -> None:
        try:
            while self._later:
                env, reply, outcome, headers = self._later.popleft()
                try:
                    delivery = await self.send_reply(env, reply, headers)
                except Exception as e:  # only a bug: send_reply hands every delivery failure to its future
                    outcome.set_exception(e)
                    continue
                delivery.add_done_callback(functools.partial(forward, outcome=outcome))
        finally:
            self._sending_later = False
            while self._later:  # cancelled midway (shutdown): what is left fails rather than waits forever
                self._later.popleft()[2].cancel()

    async def deliver_reply(self, env: RequestEnvelope, reply: Reply, replaceable: bool = True,
                            headers: Headers | None = None) -> Any:
        """Deliver a reply; a response too large for one message goes in parts, anything else the broker
        refuses as too large becomes a 413 error reply in its place, and
        one whose topic or partition does not exist goes to the dead letters (no error could reach the
        caller there either)."""
        value = encode(reply)
        try:
            if reply.type == "response" and len(value) >= topics.MAX_MESSAGE_BYTES:
                return await self.deliver_in_parts(env, reply, len(value))
            try:
                return await send_and_wait(self.producer, env.reply_topic, value, key=env.id.encode(),
                                           partition=env.reply_partition, headers=headers)
            except DeliveryRefused as refused:
                if refused.reason != REFUSED_TOO_LARGE or reply.type != "response":
                    raise
                # The reply topic takes less than ours do (a batch producer's, created with Kafka's defaults).
                return await self.deliver_in_parts(env, reply, len(value))
        except DeliveryRefused as refused:
            if refused.reason == REFUSED_TOO_LARGE and replaceable:
                log.warning("reply too large; answering with an error", extra={"request_id": env.id,
                                                                              "bytes": refused.size})
                return await self.deliver_reply(env, too_large_reply(env, reply, refused), replaceable=False,
                                                headers=headers)
            return await bury(self.producer, refused, value, key=env.id.encode(), service=self.service,
                              request_id=env.id)

    async def deliver_in_parts(self, env: RequestEnvelope, reply: Reply, size: int) -> Any:
        """Deliver a response too large for one message as parts, then the response itself (shared/parts.py):
        every part is acknowledged before the response goes, so a reader never meets a response whose parts
        were refused. Over MAX_REPLY_BYTES it is refused as too large (the caller gets a 413)."""
        log.info("reply too large for one message; sending it in parts", extra={"request_id": env.id,
                                                                                "bytes": size})
        data = orjson.dumps(reply.data)
        if len(data) > MAX_REPLY_BYTES:
            raise too_large(env.reply_topic, env.reply_partition, size, MAX_REPLY_BYTES)
        *parts, whole = split(reply, data)
        for part in parts:  # one at a time: a refusal is typed (DeliveryRefused) and nothing follows it
            await send_and_wait(self.producer, env.reply_topic, encode(part), key=env.id.encode(),
                                partition=env.reply_partition)
        return await send_and_wait(self.producer, env.reply_topic, encode(whole), key=env.id.encode(),
                                   partition=env.reply_partition)

    async def reply_error(self, env: RequestEnvelope, err: GatewayError) -> asyncio.Future[Any]:
        reply = Reply(id=env.id, attempt=env.attempt, seq=OUT_OF_BAND, type="error", status=err.status,
                      data=err.body(), headers=err.response_headers(), custom_id=env.custom_id)
        return await self.send_reply(env, reply)

    def retry(self, env: RequestEnvelope, dep: Deployment, err: GatewayError,
               latency_ms: float = 0.0) -> asyncio.Future[Any]:
        """Hand the request back to the router with this attempt in its history; it picks what comes next."""
        nxt = env.model_copy(deep=True)
        nxt.attempt += 1
        nxt.not_before_ms = 0
        nxt.history.append(AttemptRecord(deployment=dep.id, status=err.status, error_type=err.type,
                                         message=err.message, retry_after_s=err.retry_after_s, code=err.code,
                                         param=err.param, latency_ms=latency_ms))
        return deliver(self.producer, topics.REQUESTS, encode(nxt), key=env.id.encode(),
                       headers=tracing.current_headers())

    async def record(self, topic: str, message: UsageEvent | AttemptEvent, key: bytes) -> asyncio.Future[Any]:
        """Usage and events have no caller to answer: what the broker refuses is dead-lettered."""
        value, headers = encode(message), tracing.current_headers()
        return await queue_then(lambda: send_or_bury(self.producer, topic, value, key=key, service=self.service,
                                                     request_id=message.request_id, headers=headers),
                                self.producer, topic, value, key=key, headers=headers)

    async def started(self, env: RequestEnvelope, dep: Deployment) -> asyncio.Future[Any]:
        """Tell every router a call began: least-busy counts it, and it takes a half-open breaker's probe."""
        event = AttemptEvent(request_id=env.id, attempt=env.attempt, deployment=dep.id, provider=dep.provider,
                             model_group=env.model_group or env.model, ok=True, phase="start")
        return await self.record(topics.EVENTS, event, dep.id.encode())

    async def store_write_ahead(self, started: UsageEvent) -> None:
        """Store a call's write-ahead usage record; returns once the broker has acknowledged it (the call may
        then be made)."""
        await send_and_wait(self.producer, topics.USAGE, encode(started), key=usage_key(started),
                            headers=tracing.current_headers())

    @staticmethod
    def write_ahead(env: RequestEnvelope, dep: Deployment, call_seq: int) -> UsageEvent:
        """The usage record of a call about to be made: stored "in doubt" until its outcome arrives."""
        return UsageEvent(
            event_id=uuid.uuid4().hex, request_id=env.id, attempt=env.attempt, call_seq=call_seq, kind=env.kind,
            provider=dep.provider, deployment=dep.id, model_group=env.model_group or env.model,
            provider_model=dep.model, key_id=env.key_id, metadata=env.metadata, status=IN_DOUBT, ok=False,
            stream=env.stream, priority=env.priority,
        )

    async def usage(self, started: UsageEvent, result: CallResult | None,
               failed: CallFailed | None, env: RequestEnvelope) -> asyncio.Future[Any]:
        """The call's outcome, under its write-ahead record's event id (accounting completes that row)."""
        event = started.model_copy(update={
            "usage": result.usage if result else failed.usage if failed and failed.usage else started.usage,
            "status": failed.error.status if failed else 200, "ok": failed is None,
            "latency_ms": result.latency_ms if result else failed.latency_ms if failed else 0.0,
            "ttft_ms": result.ttft_ms if result else None, "total_ms": float(now_ms() - env.created_ms),
        })
        return await self.record(topics.USAGE, event, usage_key(event))

    async def event(self, env: RequestEnvelope, dep: Deployment, result: CallResult | None,
                     failed: CallFailed | None) -> asyncio.Future[Any]:
        event = AttemptEvent(
            request_id=env.id, attempt=env.attempt, deployment=dep.id, provider=dep.provider,
            model_group=env.model_group or env.model, ok=failed is None,
            status=failed.error.status if failed else 200, error_type=failed.error.type if failed else None,
            retry_after_s=failed.error.retry_after_s if failed else None,
            latency_ms=result.latency_ms if result else failed.latency_ms if failed else 0.0,
            ttft_ms=result.ttft_ms if result else None,
        )
        return await self.record(topics.EVENTS, event, dep.id.encode())


def too_large_reply(env: RequestEnvelope, reply: Reply, refused: DeliveryRefused) -> Reply:
    """The error that answers a request whose reply (or one of its stream's chunks) is over the limit."""
    message = (f"The reply to this request is {refused.size:,} bytes, more than the {refused.limit:,} bytes "
               "a reply may have.")
    if env.kind == "embeddings":
        message += " Send fewer inputs per request (or ask for fewer dimensions)."
    err = GatewayError(413, message, code="reply_too_large", retryable=False)
    return Reply(id=reply.id, attempt=reply.attempt, seq=OUT_OF_BAND, type="error", status=err.status,
                 data=err.body(), custom_id=reply.custom_id, call=reply.call)


def usage_key(event: UsageEvent) -> bytes:
    """By virtual key, else by request: a call's two records share a partition, so they stay in order."""
    return (event.key_id or event.request_id).encode()


def usage_chunk(result: CallResult, env: RequestEnvelope) -> dict[str, Any]:
    if result.usage_chunk is not None:
        return result.usage_chunk
    u = result.usage
    return {"id": f"chatcmpl-{env.id}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": env.model, "choices": [],
            "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                      "total_tokens": u.prompt_tokens + u.completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
                      "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}}
