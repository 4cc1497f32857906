"""`switchyard worker --provider NAME`: the provider's pool, one consumer group on its topics.

Each message becomes a task; many calls are in flight per process. Offsets are committed
only up to the oldest unfinished message, after everything that message owes (reply,
usage, event, or its retry envelope) has been acknowledged by the broker.

Every provider call is recorded on `llm.usage` before it is made (acknowledged by the broker
first), so a worker killed mid-call leaves a usage row "in doubt" rather than a call nobody
counted. When the group rebalances, a worker cancels the work that has not begun its provider call
(queued in the pacer, or waiting for its not-before time: the next owner gets it again) and finishes
the calls it has in flight (up to SWITCHYARD_WORKER_DRAIN_S) before giving its partitions up, so the
next owner does not call again. A `CancelRequest` on `llm.cancel` (its client went away) stops the call held
for that request (services/workers/cancels.py): its usage is still recorded (499), it is not retried, and its
offset is committed as done.

A message never stops the process: a response too large for one message is sent in parts
(shared/parts.py), and one past SWITCHYARD_MAX_REPLY_BYTES, or a chunk the broker refuses, with a 413;
one whose topic or partition does not exist is dead-lettered (shared/dead.py); any other failure of
one message becomes an error reply to its request. Only a broker that stays unreachable makes the
worker exit, uncommitted, so the group redelivers what it held.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from switchyard.services.workers import observe
from switchyard.services.workers.calls import (
    CLIENT_CLOSED,
    UPSTREAM_AUTH_ERROR,
    CallFailed,
    CallResult,
    Cancel,
    call,
    for_caller,
    make_client,
)
from switchyard.services.workers.cancels import Cancels
from switchyard.services.workers.chunks import ChunkStream
from switchyard.services.workers.guarding import OutputGuard
from switchyard.services.workers.pacing import Lease, Pacer
from switchyard.services.workers.providers import get_adapter
from switchyard.services.workers.providers.base import CallContext
from switchyard.services.workers.providers.native import native_request
from switchyard.shared import metrics, topics, tracing
from switchyard.shared.answers import problems, refuse_unreadable
from switchyard.shared.config import Deployment, GatewayConfig, load_config, load_settings
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
from switchyard.shared.dead import bury, deliver_or_bury
from switchyard.shared.errors import GatewayError, timeout_error
from switchyard.shared.guardrails import Guardrails
from switchyard.shared.health import health_port_default, serve_health
from switchyard.shared.kafka import (
    REFUSED_TOO_LARGE,
    Claim,
    DeliveryRefused,
    OffsetTracker,
    commit,
    deliver,
    encode,
    group_instance_id,
    make_consumer,
    make_producer,
    send_and_wait,
    start_client,
    too_large,
)
from switchyard.shared.lag import follow_lag
from switchyard.shared.logs import setup_logging
from switchyard.shared.parts import MAX_REPLY_BYTES, split
from switchyard.shared.service import run_until_signal

log = logging.getLogger("switchyard.worker")
MAX_IN_FLIGHT = int(os.environ.get("SWITCHYARD_WORKER_MAX_IN_FLIGHT", "512"))
BATCH_MAX_IN_FLIGHT = int(os.environ.get("SWITCHYARD_WORKER_BATCH_IN_FLIGHT", "256"))
FETCH_MAX = 256
COMMIT_INTERVAL_S = 0.2
DRAIN_S = float(os.environ.get("SWITCHYARD_WORKER_DRAIN_S", "30"))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.worker.give_up(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.worker.ready = True


class Worker:
    def __init__(self, provider: str, bootstrap: str, config: GatewayConfig) -> None:
        self.provider = provider
        self.service = f"worker.{provider}"
        self.adapter = get_adapter(provider)
        self.config = config
        self.guardrails = Guardrails(config.guardrails)
        self.producer: AIOKafkaProducer = make_producer(bootstrap)
        group = topics.worker_group(provider)
        # The rebalance timeout covers the drain (see `drain`), so the coordinator never evicts a worker that is
        # finishing its calls and hands their partitions to a new owner that would call again.
        self.consumer: AIOKafkaConsumer = make_consumer(bootstrap=bootstrap, group_id=group,
                                                        group_instance_id=group_instance_id(group),
                                                        rebalance_timeout_ms=int((DRAIN_S + 10) * 1000),
                                                        max_poll_records=FETCH_MAX)
        self.tracker = OffsetTracker()
        self.pacer = Pacer(owned=self._owned, partitions=topics.PROVIDER_PARTITIONS)
        self.client = make_client()
        self.bootstrap = bootstrap
        self.cancels = Cancels()
        """The calls this process holds, stopped by `llm.cancel` (a client that went away)."""
        self.ready = False
        self._in_flight = {False: 0, True: 0}
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._calling: set[asyncio.Task[Any]] = set()
        """Tasks past the point of no return: their provider call has begun, or they are delivering what
        their message owes. A revocation drains these and cancels every other task."""

    def _owned(self) -> list[int]:
        """The provider partitions this process owns (of the interactive topic, else of the batch one); none
        during a rebalance, so it starts no new call then."""
        assigned = self.consumer.assignment()
        for topic in (topics.provider_topic(self.provider), topics.provider_topic(self.provider, True)):
            owned = [tp.partition for tp in assigned if tp.topic == topic]
            if owned:
                return owned
        return []

    async def start(self) -> None:
        # Together: following llm.cancel adds no time before the worker joins its group.
        await asyncio.gather(self.cancels.start(self.bootstrap), start_client(self.producer, "worker-producer"),
                             start_client(self.consumer, "worker-consumer"))
        self.consumer.subscribe([topics.provider_topic(self.provider), topics.provider_topic(self.provider, True)],
                                listener=_Rebalance(self))

    async def stop(self) -> None:
        await self.give_up(list(self._tasks), timeout_s=10)
        await self.consumer.stop()
        await self.producer.stop()
        await self.client.aclose()
        await self.cancels.stop()

    async def give_up(self, partitions: list[TopicPartition], timeout_s: float = DRAIN_S) -> None:
        """Hand partitions over (revoked, or the worker stops): cancel, drain, commit, forget.

        Work that has not begun its provider call is cancelled at once: it costs nothing to redo, and
        waiting for it could take hours (batch work queued for its provider's limits). The calls in
        flight are drained (up to `timeout_s`), since a call still running when its partition moves is
        made a second time by the next owner (stored and marked `redelivered`, but paid twice). Then the
        finished offsets are committed and the partitions forgotten, which fences any task that outlives
        the drain: its end no longer counts for the partition's next assignment (OffsetTracker).
        """
        tasks = [t for tp in partitions for t in self._tasks.pop(tp, ())]
        queued = [t for t in tasks if t not in self._calling]
        for task in queued:
            task.cancel()
        calling = [t for t in tasks if t in self._calling]
        if tasks:
            log.info("giving partitions up", extra={"cancelled": len(queued), "calls": len(calling)})
        if calling:
            _, pending = await asyncio.wait(calling, timeout=timeout_s)
            if pending:
                log.warning("calls still in flight after the drain; their next owner will redo them",
                            extra={"calls": len(pending)})
        await self.commit()
        self.tracker.forget(partitions)

    async def commit(self) -> None:
        offsets = self.tracker.committable()
        if offsets and await commit(self.consumer, offsets):
            self.tracker.mark_committed(offsets)

    def _no_return(self, now: bool = True) -> None:
        """Mark the current task as past the point of no return (or, `now=False`, back to waiting)."""
        task = asyncio.current_task()
        if task is not None:
            if now:
                self._calling.add(task)
            else:
                self._calling.discard(task)

    def _backpressure(self) -> None:
        """Pause a class of partitions (interactive or batch) while that class has its fill of messages
        in flight: the backlog stays in Kafka, and a batch backlog never takes the slots interactive
        requests need."""
        for is_batch, limit in ((False, MAX_IN_FLIGHT), (True, BATCH_MAX_IN_FLIGHT)):
            parts = [tp for tp in self.consumer.assignment() if tp.topic.endswith(topics.BATCH_SUFFIX) == is_batch]
            if self._in_flight[is_batch] >= limit:
                self.consumer.pause(*parts)
            else:
                self.consumer.resume(*parts)

    async def consume_forever(self) -> None:
        last_commit = time.monotonic()
        while True:
            self._backpressure()
            batches = await self.consumer.getmany(timeout_ms=100, max_records=FETCH_MAX)
            for tp, records in batches.items():
                is_batch = tp.topic.endswith(topics.BATCH_SUFFIX)
                for record in records:
                    self._in_flight[is_batch] += 1
                    claim = self.tracker.started(tp, record.offset)
                    task = asyncio.create_task(self._process(claim, record.value, is_batch, record))
                    running = self._tasks.setdefault(tp, set())
                    running.add(task)
                    task.add_done_callback(running.discard)
                    task.add_done_callback(self._calling.discard)
            if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                await self.commit()
                last_commit = time.monotonic()

    async def _process(self, claim: Claim, raw: bytes, is_batch: bool, record: Any = None) -> None:
        """Handle one message and deliver what it owes; then its offset may be committed.

        A failure of this message alone (a bug, a delivery the broker refuses) is answered with an error
        reply, once every other delivery it started has ended, and the worker moves on. A KafkaError here
        means the broker stayed unreachable through every retry: the worker exits without committing, so
        the group redelivers the message (to a restarted or another worker). Cancellation (a revocation)
        leaves the offset unfinished: redelivered.
        """
        if record is not None:
            parent = tracing.from_record(record.headers)
            tracing.wait_in_topic(record.topic, parent, record.timestamp)
            tracing.receive(parent)
        try:
            try:
                acks = await self.handle(raw)
                self._no_return()
                for outcome in await asyncio.gather(*acks, return_exceptions=True):
                    if isinstance(outcome, Exception):
                        raise outcome
            except KafkaError:
                raise
            except Exception as e:
                self._no_return()
                await self._answer_failure(raw, e)
        except KafkaError:
            log.exception("could not deliver what a message owes; exiting for redelivery",
                          extra={"offset": claim.offset})
            os._exit(3)
        finally:
            self._in_flight[is_batch] -= 1
        self.tracker.finished(claim)

    async def _answer_failure(self, raw: bytes, error: Exception) -> None:
        """Answer a message whose handling failed with an error reply (502 when the broker refused what it
        owed, 500 otherwise), so its caller is not left waiting and the offset moves on."""
        try:
            env = RequestEnvelope.model_validate_json(raw)
        except ValidationError as e:
            log.error("dropping a message that failed and is not an envelope",
                      extra={"error": type(error).__name__, "problems": problems(e)})
            return
        if isinstance(error, DeliveryRefused):
            log.error("the broker refused what a request owes; answering with an error",
                      extra={"request_id": env.id, "reason": error.reason, "error": error.message})
            err = GatewayError(502, f"The gateway could not deliver this request's messages: {error.message}.",
                               code="delivery_refused", retryable=False)
        else:
            log.error("handling a request failed; answering with an error", exc_info=error,
                      extra={"request_id": env.id})
            err = GatewayError(500, "The worker failed while handling this request.", code="worker_error",
                               retryable=False)
        try:
            await self._reply_error(env, err)
        except KafkaError:
            raise
        except Exception:
            log.exception("dropping a request that can be neither answered nor dead-lettered",
                          extra={"request_id": env.id})

    # ---- one message --------------------------------------------------------------------------

    async def handle(self, raw: bytes) -> list[asyncio.Future[Any]]:
        try:
            env = RequestEnvelope.model_validate_json(raw)
        except ValidationError as e:  # never from a router: answered where it can be, else dead-lettered
            return [asyncio.ensure_future(refuse_unreadable(self.producer, raw, e, service=self.service))]
        dep = self.config.deployment(env.deployment or "")
        if dep is None:
            err = GatewayError(500, f"deployment {env.deployment!r} is not configured on this worker",
                               code="unknown_deployment", retryable=False)
            return [self._reply_error(env, err)]
        if dep.credentials_missing:  # the operator's log names the variable (at start); the caller gets no detail
            err = GatewayError(502, f"The gateway could not authenticate with the provider of this model "
                               f"({self.provider}); the operator has been told.", code=UPSTREAM_AUTH_ERROR,
                               retryable=False)
            return [self._reply_error(env, err)]
        with self.cancels.holding(env.id) as cancel:
            return await self._attempt(env, dep, cancel)

    async def _attempt(self, env: RequestEnvelope, dep: Deployment, cancel: Cancel) -> list[asyncio.Future[Any]]:
        """Wait for the request's time and a slot, then call (again, after a 429 another key can serve);
        a request whose client went away before its call began is dropped: nobody waits for its answer."""
        wait_s = (env.not_before_ms - now_ms()) / 1000.0
        if wait_s > 0:
            await asyncio.sleep(min(wait_s, max(0.0, (env.deadline_ms - now_ms()) / 1000.0)))
        if env.expired():
            return [self._reply_error(env, timeout_error())]
        acks: list[asyncio.Future[Any]] = []
        call_seq = 0
        while True:
            if cancel.requested:
                log.info("dropping a request whose client went away before its call", extra={"request_id": env.id})
                return acks
            try:
                async with self.pacer.slot(dep, env) as lease:
                    self._no_return()
                    if env.expired():
                        return [*acks, self._reply_error(env, timeout_error())]
                    done, retry_here = await self._call(env, dep, lease, call_seq, cancel)
                    acks.extend(done)
                    call_seq += 1
            except GatewayError as e:  # no slot before an interactive request's deadline: let the router decide
                return [*acks, self._retry(env, dep, e)]
            if not retry_here:
                return acks
            self._no_return(False)  # waiting for a key again: nothing in flight to lose

    async def _call(self, env: RequestEnvelope, dep: Deployment, lease: Lease,
                    call_seq: int, cancel: Cancel | None = None) -> tuple[list[asyncio.Future[Any]], bool]:
        """One provider call and everything it owes; True when the worker should call again itself
        (a 429 that paused one key while another key, or for batch, time, can still serve it)."""
        acks: list[asyncio.Future[Any]] = []
        route = f"group={env.model_group}; deployment={dep.id}; attempt={env.attempt}"
        ctx = CallContext(dep, env.body, env.stream, lease.key, env.id, strict=bool(env.body.get("strict")))
        started = self._write_ahead(env, dep, call_seq)
        hop = observe.start_attempt(env, dep)

        def send_chunks(chunks: list[dict[str, Any]], seq: int) -> asyncio.Future[Any]:
            reply = Reply(id=env.id, attempt=env.attempt, seq=seq, type="chunk", data=chunks[0], chunks=chunks[1:],
                          headers={topics.HEADER_ROUTE: route} if seq == 0 else {}, custom_id=env.custom_id,
                          call=started.event_id, format=native_format)
            return self._send_reply(env, reply)

        def blocked(err: GatewayError) -> None:  # an output guardrail ended the stream: the error goes at once
            acks.append(self._send_reply(env, Reply(id=env.id, attempt=env.attempt, seq=stream.close(), type="error",
                                                    status=err.status, data=err.body(), custom_id=env.custom_id,
                                                    headers={topics.HEADER_ROUTE: route, **guard.headers()},
                                                    call=started.event_id)))

        stream = ChunkStream(send_chunks)
        guard = OutputGuard.of(self.guardrails, env)  # nothing unmasked is produced to Kafka
        on_chunk = guard.guarded(stream.add, blocked)
        ctx.native = native_request(env, self.adapter, guarded=guard.active)  # sent as the caller wrote it
        native_format = ctx.native.format if ctx.native is not None else None

        # Queued together, the start event and the write-ahead record share one produce request; only the
        # write-ahead record must be acknowledged before the provider is called.
        acks.append(self._started(env, dep))
        await send_and_wait(self.producer, topics.USAGE, encode(started), key=_usage_key(started),
                            headers=tracing.current_headers())
        remaining_s = (env.deadline_ms - now_ms()) / 1000.0
        try:
            result = await call(self.client, self.adapter, ctx, kind=env.kind, on_chunk=on_chunk,
                                total_timeout_s=remaining_s, cancel=cancel)
        except CallFailed as failed:
            seq = stream.close()
            acks.extend(stream.sent)
            observe.finish_attempt(hop, env, dep, None, failed)
            if failed.error.status == CLIENT_CLOSED:  # its client went away: the call is owed, no answer is
                acks.append(self._usage(started, None, failed, env))
                acks.append(self._event(env, dep, None, failed))
                return acks, False
            self.pacer.observe_failure(dep, lease, failed.error)
            acks.append(self._usage(started, None, failed, env))
            acks.append(self._event(env, dep, None, failed))
            failed.error = for_caller(failed.error, dep.provider, dep.id)
            if failed.chunks_sent == 0 and failed.error.status == 429 and (
                    env.priority == "batch" or self.pacer.any_key_free(dep)):
                return acks, True
            if failed.chunks_sent == 0:
                acks.append(self._retry(env, dep, failed.error, failed.latency_ms))
            elif guard.blocked is None:
                err = failed.error
                acks.append(self._send_reply(env, Reply(id=env.id, attempt=env.attempt, seq=seq, type="error",
                                                              status=err.status, data=err.body(),
                                                              custom_id=env.custom_id, call=started.event_id)))
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
            acks.extend(stream.sent)
            if final_error is not None:
                acks.append(self._send_reply(env, Reply(id=env.id, attempt=env.attempt, seq=stream.close(),
                                                        type="error", status=final_error.status,
                                                        data=final_error.body(), headers=headers,
                                                        custom_id=env.custom_id, call=started.event_id,
                                                        provider_ms=provider_ms)))
        elif env.stream:
            if native_format is None and (env.body.get("stream_options") or {}).get("include_usage"):
                await on_chunk(_usage_chunk(result, env))
            seq = stream.close()
            acks.extend(stream.sent)
            acks.append(self._send_reply(env, Reply(id=env.id, attempt=env.attempt, seq=seq, type="end",
                                                    headers=headers, custom_id=env.custom_id, call=started.event_id,
                                                    data={"usage": _usage_chunk(result, env)["usage"]},
                                                    provider_ms=provider_ms)))
        else:
            acks.append(self._send_reply(env, Reply(id=env.id, attempt=env.attempt, type="response",
                                                          data=result.response, headers=headers,
                                                          custom_id=env.custom_id, call=started.event_id,
                                                          provider_ms=provider_ms, format=native_format,
                                                          usage=_usage_chunk(result, env)["usage"]
                                                          if native_format else None)))
        acks.append(self._usage(started, result, None, env))
        acks.append(self._event(env, dep, result, None))
        return acks, False

    def _send_reply(self, env: RequestEnvelope, reply: Reply) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self._deliver_reply(env, reply))

    async def _deliver_reply(self, env: RequestEnvelope, reply: Reply, replaceable: bool = True) -> Any:
        """Deliver a reply; a response too large for one message goes in parts, anything else the broker
        refuses as too large becomes a 413 error reply in its place, and
        one whose topic or partition does not exist goes to the dead letters (no error could reach the
        caller there either)."""
        value = encode(reply)
        try:
            if reply.type == "response" and len(value) >= topics.MAX_MESSAGE_BYTES:
                return await self._deliver_in_parts(env, reply, len(value))
            try:
                return await send_and_wait(self.producer, env.reply_topic, value, key=env.id.encode(),
                                           partition=env.reply_partition, headers=tracing.current_headers())
            except DeliveryRefused as refused:
                if refused.reason != REFUSED_TOO_LARGE or reply.type != "response":
                    raise
                # The reply topic takes less than ours do (a batch producer's, created with Kafka's defaults).
                return await self._deliver_in_parts(env, reply, len(value))
        except DeliveryRefused as refused:
            if refused.reason == REFUSED_TOO_LARGE and replaceable:
                log.warning("reply too large; answering with an error", extra={"request_id": env.id,
                                                                              "bytes": refused.size})
                return await self._deliver_reply(env, _too_large_reply(env, reply, refused), replaceable=False)
            return await bury(self.producer, refused, value, key=env.id.encode(), service=self.service,
                              request_id=env.id)

    async def _deliver_in_parts(self, env: RequestEnvelope, reply: Reply, size: int) -> Any:
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

    def _reply_error(self, env: RequestEnvelope, err: GatewayError) -> asyncio.Future[Any]:
        reply = Reply(id=env.id, attempt=env.attempt, seq=OUT_OF_BAND, type="error", status=err.status,
                      data=err.body(), headers=err.response_headers(), custom_id=env.custom_id)
        return self._send_reply(env, reply)

    def _retry(self, env: RequestEnvelope, dep: Deployment, err: GatewayError,
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

    def _record(self, topic: str, message: UsageEvent | AttemptEvent, key: bytes) -> asyncio.Future[Any]:
        """Usage and events have no caller to answer: what the broker refuses is dead-lettered."""
        return deliver_or_bury(self.producer, topic, encode(message), key=key, service=self.service,
                               request_id=message.request_id, headers=tracing.current_headers())

    def _started(self, env: RequestEnvelope, dep: Deployment) -> asyncio.Future[Any]:
        """Tell every router a call began: least-busy counts it, and it takes a half-open breaker's probe."""
        event = AttemptEvent(request_id=env.id, attempt=env.attempt, deployment=dep.id, provider=dep.provider,
                             model_group=env.model_group or env.model, ok=True, phase="start")
        return self._record(topics.EVENTS, event, dep.id.encode())

    @staticmethod
    def _write_ahead(env: RequestEnvelope, dep: Deployment, call_seq: int) -> UsageEvent:
        """The usage record of a call about to be made: stored "in doubt" until its outcome arrives."""
        return UsageEvent(
            event_id=uuid.uuid4().hex, request_id=env.id, attempt=env.attempt, call_seq=call_seq, kind=env.kind,
            provider=dep.provider, deployment=dep.id, model_group=env.model_group or env.model,
            provider_model=dep.model, key_id=env.key_id, metadata=env.metadata, status=IN_DOUBT, ok=False,
            stream=env.stream, priority=env.priority,
        )

    def _usage(self, started: UsageEvent, result: CallResult | None,
               failed: CallFailed | None, env: RequestEnvelope) -> asyncio.Future[Any]:
        """The call's outcome, under its write-ahead record's event id (accounting completes that row)."""
        event = started.model_copy(update={
            "usage": result.usage if result else failed.usage if failed and failed.usage else started.usage,
            "status": failed.error.status if failed else 200, "ok": failed is None,
            "latency_ms": result.latency_ms if result else failed.latency_ms if failed else 0.0,
            "ttft_ms": result.ttft_ms if result else None, "total_ms": float(now_ms() - env.created_ms),
        })
        return self._record(topics.USAGE, event, _usage_key(event))

    def _event(self, env: RequestEnvelope, dep: Deployment, result: CallResult | None,
                     failed: CallFailed | None) -> asyncio.Future[Any]:
        event = AttemptEvent(
            request_id=env.id, attempt=env.attempt, deployment=dep.id, provider=dep.provider,
            model_group=env.model_group or env.model, ok=failed is None,
            status=failed.error.status if failed else 200, error_type=failed.error.type if failed else None,
            retry_after_s=failed.error.retry_after_s if failed else None,
            latency_ms=result.latency_ms if result else failed.latency_ms if failed else 0.0,
            ttft_ms=result.ttft_ms if result else None,
        )
        return self._record(topics.EVENTS, event, dep.id.encode())


def _too_large_reply(env: RequestEnvelope, reply: Reply, refused: DeliveryRefused) -> Reply:
    """The error that answers a request whose reply (or one of its stream's chunks) is over the limit."""
    message = (f"The reply to this request is {refused.size:,} bytes, more than the {refused.limit:,} bytes "
               "a reply may have.")
    if env.kind == "embeddings":
        message += " Send fewer inputs per request (or ask for fewer dimensions)."
    err = GatewayError(413, message, code="reply_too_large", retryable=False)
    return Reply(id=reply.id, attempt=reply.attempt, seq=OUT_OF_BAND, type="error", status=err.status,
                 data=err.body(), custom_id=reply.custom_id, call=reply.call)


def _usage_key(event: UsageEvent) -> bytes:
    """By virtual key, else by request: a call's two records share a partition, so they stay in order."""
    return (event.key_id or event.request_id).encode()


def _usage_chunk(result: CallResult, env: RequestEnvelope) -> dict[str, Any]:
    if result.usage_chunk is not None:
        return result.usage_chunk
    u = result.usage
    return {"id": f"chatcmpl-{env.id}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": env.model, "choices": [],
            "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                      "total_tokens": u.prompt_tokens + u.completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
                      "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", required=True, help="the provider whose topic this pool consumes")
    parser.add_argument("--health-port", type=int, default=health_port_default(),
                        help="serve /health and /ready on this port (default: $SWITCHYARD_HEALTH_PORT)")


async def serve(args: argparse.Namespace) -> None:
    settings = load_settings()
    config = load_config(args.config, secrets_for=args.provider)  # this pool's secrets, no other provider's
    for dep in (d for m in config.models for d in m.deployments if d.credentials_missing):
        log.error("a deployment has no credentials; its calls fail with upstream_auth_error",
                  extra={"deployment": dep.id, "reason": dep.credentials_missing})
    worker = Worker(args.provider, settings.bootstrap_servers, config)
    tracing.setup_tracing(f"worker-{args.provider}")
    await worker.start()
    metrics.on_scrape(worker.pacer.export_depth)
    if args.health_port:
        await serve_health(args.health_port, lambda: worker.ready)
    log.info("worker started", extra={"provider": args.provider})
    await run_until_signal(log, worker.consume_forever(), follow_lag(worker.consumer, f"workers.{args.provider}"),
                           worker.cancels.follow())
    await worker.stop()
    tracing.shutdown()


def run(args: argparse.Namespace) -> None:
    import uvloop

    setup_logging(f"worker.{args.provider}")
    uvloop.run(serve(args))
