"""`switchyard worker --provider NAME`: the provider's pool, one consumer group on its topics.

Each message becomes a task; many calls are in flight per process. Offsets are committed
only up to the oldest unfinished message, after everything that message owes (reply,
usage, event, or its retry envelope) has been acknowledged by the broker.

Every provider call is recorded on `llm.usage` before it is made (acknowledged by the broker
first), so a worker killed mid-call leaves a usage row "in doubt" rather than a call nobody
counted. When the group rebalances, a worker finishes the calls it has in flight (up to
SWITCHYARD_WORKER_DRAIN_S) before giving its partitions up, so the new owner does not call again.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from services.workers.calls import CallFailed, CallResult, call, make_client
from services.workers.pacing import Lease, Pacer
from services.workers.providers import get_adapter
from services.workers.providers.base import CallContext
from shared import topics
from shared.config import Deployment, GatewayConfig, load_config, load_settings
from shared.contracts import (
    IN_DOUBT,
    OUT_OF_BAND,
    AttemptEvent,
    AttemptRecord,
    Reply,
    RequestEnvelope,
    UsageEvent,
    now_ms,
)
from shared.errors import GatewayError, timeout_error
from shared.health import health_port_default, serve_health
from shared.kafka import (
    OffsetTracker,
    deliver,
    encode,
    group_instance_id,
    make_consumer,
    make_producer,
    send_and_wait,
    start_client,
)
from shared.logs import setup_logging
from shared.service import run_until_signal

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
        await self.worker.drain(revoked)
        await self.worker.commit()
        self.worker.tracker.forget(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.worker.ready = True


class Worker:
    def __init__(self, provider: str, bootstrap: str, config: GatewayConfig) -> None:
        self.provider = provider
        self.adapter = get_adapter(provider)
        self.config = config
        self.producer: AIOKafkaProducer = make_producer(bootstrap)
        group = f"workers.{provider}"
        # The rebalance timeout covers the drain (see `drain`), so the coordinator never evicts a worker that is
        # finishing its calls and hands their partitions to a new owner that would call again.
        self.consumer: AIOKafkaConsumer = make_consumer(bootstrap=bootstrap, group_id=group,
                                                        group_instance_id=group_instance_id(group),
                                                        rebalance_timeout_ms=int((DRAIN_S + 10) * 1000),
                                                        max_poll_records=FETCH_MAX)
        self.tracker = OffsetTracker()
        self.pacer = Pacer(share=self._share)
        self.client: httpx.AsyncClient = make_client()
        self.ready = False
        self._in_flight = {False: 0, True: 0}
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}

    def _share(self) -> float:
        """The part of the provider's traffic this process sees: the partitions it owns, of all."""
        owned = [tp for tp in self.consumer.assignment() if tp.topic == topics.provider_topic(self.provider)]
        return len(owned) / topics.PROVIDER_PARTITIONS if owned else 1.0

    async def start(self) -> None:
        await start_client(self.producer, "worker-producer")
        await start_client(self.consumer, "worker-consumer")
        self.consumer.subscribe([topics.provider_topic(self.provider), topics.provider_topic(self.provider, True)],
                                listener=_Rebalance(self))

    async def stop(self) -> None:
        await self.drain(list(self._tasks), timeout_s=10)
        await self.commit()
        await self.consumer.stop()
        await self.producer.stop()
        await self.client.aclose()

    async def drain(self, partitions: list[TopicPartition], timeout_s: float = DRAIN_S) -> None:
        """Let the messages in flight from these partitions finish, so their offsets can be committed.

        Called before partitions are given up: a call still running when they move would be
        made a second time by their next owner (stored and marked `redelivered`, but paid twice).
        """
        running = [t for tp in partitions for t in self._tasks.get(tp, ())]
        if running:
            log.info("finishing calls in flight before a rebalance", extra={"calls": len(running)})
            _, pending = await asyncio.wait(running, timeout=timeout_s)
            if pending:
                log.warning("calls still in flight after the drain; their next owner will redo them",
                            extra={"calls": len(pending)})

    async def commit(self) -> None:
        offsets = self.tracker.committable()
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
            self.tracker.mark_committed(offsets)
        except KafkaError as e:
            log.warning("commit failed (rebalance?)", extra={"error": repr(e)})

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
                    self.tracker.started(tp, record.offset)
                    task = asyncio.create_task(self._process(tp, record.offset, record.value, is_batch))
                    running = self._tasks.setdefault(tp, set())
                    running.add(task)
                    task.add_done_callback(running.discard)
            if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                await self.commit()
                last_commit = time.monotonic()

    async def _process(self, tp: TopicPartition, offset: int, raw: bytes, is_batch: bool) -> None:
        try:
            acks = await self.handle(raw)
            if acks:
                await asyncio.gather(*acks)
        except Exception:
            # What this message owes could not be acknowledged even after retries: exit without
            # committing, so the group redelivers it (to a restarted or another worker).
            log.exception("could not deliver what a message owes; exiting for redelivery", extra={"offset": offset})
            os._exit(3)
        finally:
            self._in_flight[is_batch] -= 1
        self.tracker.finished(tp, offset)

    # ---- one message --------------------------------------------------------------------------

    async def handle(self, raw: bytes) -> list[asyncio.Future[Any]]:
        try:
            env = RequestEnvelope.model_validate_json(raw)
        except ValidationError as e:
            log.error("dropping malformed envelope", extra={"error": str(e)[:300]})
            return []
        dep = self.config.deployment(env.deployment or "")
        if dep is None:
            err = GatewayError(500, f"deployment {env.deployment!r} is not configured on this worker",
                               code="unknown_deployment", retryable=False)
            return [self._reply_error(env, err)]
        wait_s = (env.not_before_ms - now_ms()) / 1000.0
        if wait_s > 0:
            await asyncio.sleep(min(wait_s, max(0.0, (env.deadline_ms - now_ms()) / 1000.0)))
        if env.expired():
            return [self._reply_error(env, timeout_error())]
        acks: list[asyncio.Future[Any]] = []
        call_seq = 0
        while True:
            try:
                async with self.pacer.slot(dep, env) as lease:
                    if env.expired():
                        return [*acks, self._reply_error(env, timeout_error())]
                    done, retry_here = await self._call(env, dep, lease, call_seq)
                    acks.extend(done)
                    call_seq += 1
            except GatewayError as e:  # no slot before an interactive request's deadline: let the router decide
                return [*acks, self._retry(env, dep, e)]
            if not retry_here:
                return acks

    async def _call(self, env: RequestEnvelope, dep: Deployment, lease: Lease,
                    call_seq: int) -> tuple[list[asyncio.Future[Any]], bool]:
        """One provider call and everything it owes; True when the worker should call again itself
        (a 429 that paused one key while another key, or for batch, time, can still serve it)."""
        acks: list[asyncio.Future[Any]] = []
        route = f"group={env.model_group}; deployment={dep.id}; attempt={env.attempt}"
        ctx = CallContext(dep, env.body, env.stream, lease.key, env.id, strict=bool(env.body.get("strict")))
        started = self._write_ahead(env, dep, call_seq)
        seq = 0

        async def on_chunk(c: dict[str, Any]) -> None:
            nonlocal seq
            reply = Reply(id=env.id, attempt=env.attempt, seq=seq, type="chunk", data=c,
                          headers={topics.HEADER_ROUTE: route} if seq == 0 else {}, custom_id=env.custom_id,
                          call=started.event_id)
            seq += 1
            acks.append(self._send_reply(env, reply))

        await send_and_wait(self.producer, topics.USAGE, encode(started), key=_usage_key(started))
        acks.append(self._started(env, dep))
        remaining_s = (env.deadline_ms - now_ms()) / 1000.0
        try:
            result = await call(self.client, self.adapter, ctx, kind=env.kind, on_chunk=on_chunk,
                                total_timeout_s=remaining_s)
        except CallFailed as failed:
            self.pacer.observe_failure(dep, lease, failed.error)
            acks.append(self._usage(started, None, failed))
            acks.append(self._event(env, dep, None, failed))
            if failed.chunks_sent == 0 and failed.error.status == 429 and (
                    env.priority == "batch" or self.pacer.any_key_free(dep)):
                return acks, True
            if failed.chunks_sent == 0:
                acks.append(self._retry(env, dep, failed.error))
            else:
                err = failed.error
                acks.append(self._send_reply(env, Reply(id=env.id, attempt=env.attempt, seq=seq, type="error",
                                                              status=err.status, data=err.body(),
                                                              custom_id=env.custom_id, call=started.event_id)))
            return acks, False
        self.pacer.record_usage(lease, result.usage.prompt_tokens + result.usage.completion_tokens)
        headers = {topics.HEADER_ROUTE: route}
        if result.dropped_params:
            headers[topics.HEADER_DROPPED_PARAMS] = ",".join(result.dropped_params)
        if env.stream:
            if (env.body.get("stream_options") or {}).get("include_usage"):
                await on_chunk(_usage_chunk(result, env))
            acks.append(self._send_reply(env, Reply(id=env.id, attempt=env.attempt, seq=seq, type="end",
                                                    headers=headers, custom_id=env.custom_id, call=started.event_id,
                                                    data={"usage": _usage_chunk(result, env)["usage"]})))
        else:
            acks.append(self._send_reply(env, Reply(id=env.id, attempt=env.attempt, type="response",
                                                          data=result.response, headers=headers,
                                                          custom_id=env.custom_id, call=started.event_id)))
        acks.append(self._usage(started, result, None))
        acks.append(self._event(env, dep, result, None))
        return acks, False

    def _send_reply(self, env: RequestEnvelope, reply: Reply) -> asyncio.Future[Any]:
        return deliver(self.producer, env.reply_topic, encode(reply), key=env.id.encode(),
                          partition=env.reply_partition)

    def _reply_error(self, env: RequestEnvelope, err: GatewayError) -> asyncio.Future[Any]:
        reply = Reply(id=env.id, attempt=env.attempt, seq=OUT_OF_BAND, type="error", status=err.status,
                      data=err.body(), headers=err.response_headers(), custom_id=env.custom_id)
        return self._send_reply(env, reply)

    def _retry(self, env: RequestEnvelope, dep: Deployment, err: GatewayError) -> asyncio.Future[Any]:
        """Hand the request back to the router with this attempt in its history; it picks what comes next."""
        nxt = env.model_copy(deep=True)
        nxt.attempt += 1
        nxt.not_before_ms = 0
        nxt.history.append(AttemptRecord(deployment=dep.id, status=err.status, error_type=err.type,
                                         message=err.message, retry_after_s=err.retry_after_s, code=err.code))
        return deliver(self.producer, topics.REQUESTS, encode(nxt), key=env.id.encode())

    def _started(self, env: RequestEnvelope, dep: Deployment) -> asyncio.Future[Any]:
        """Tell every router a call began: least-busy counts it, and it takes a half-open breaker's probe."""
        event = AttemptEvent(request_id=env.id, attempt=env.attempt, deployment=dep.id, provider=dep.provider,
                             model_group=env.model_group or env.model, ok=True, phase="start")
        return deliver(self.producer, topics.EVENTS, encode(event), key=dep.id.encode())

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
               failed: CallFailed | None) -> asyncio.Future[Any]:
        """The call's outcome, under its write-ahead record's event id (accounting completes that row)."""
        event = started.model_copy(update={
            "usage": result.usage if result else started.usage,
            "status": failed.error.status if failed else 200, "ok": failed is None,
            "latency_ms": result.latency_ms if result else failed.latency_ms if failed else 0.0,
        })
        return deliver(self.producer, topics.USAGE, encode(event), key=_usage_key(event))

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
        return deliver(self.producer, topics.EVENTS, encode(event), key=dep.id.encode())


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
    worker = Worker(args.provider, settings.bootstrap_servers, load_config(args.config))
    await worker.start()
    if args.health_port:
        await serve_health(args.health_port, lambda: worker.ready)
    log.info("worker started", extra={"provider": args.provider})
    await run_until_signal(log, worker.consume_forever())
    await worker.stop()


def run(args: argparse.Namespace) -> None:
    import uvloop

    setup_logging(f"worker.{args.provider}")
    uvloop.run(serve(args))
