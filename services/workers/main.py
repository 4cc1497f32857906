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

This module is the consumer loop and its wiring; one message's calls are pipeline.py, and what a message owes
is produced by outbox.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from switchyard.services.workers.calls import (
    make_client,
)
from switchyard.services.workers.cancels import Cancels
from switchyard.services.workers.outbox import Outbox
from switchyard.services.workers.pacing import Pacer
from switchyard.services.workers.pipeline import Pipeline
from switchyard.services.workers.providers import get_adapter
from switchyard.shared import gc_settings, metrics, topics, tracing
from switchyard.shared.answers import problems
from switchyard.shared.config import load_config
from switchyard.shared.config_schema import GatewayConfig
from switchyard.shared.contracts import (
    RequestEnvelope,
)
from switchyard.shared.errors import GatewayError
from switchyard.shared.health import serve_health
from switchyard.shared.kafka import group_instance_id, make_consumer, make_producer, start_client
from switchyard.shared.kafka_destinations import DeliveryRefused
from switchyard.shared.kafka_offsets import Claim, OffsetTracker, commit
from switchyard.shared.lag import follow_lag
from switchyard.shared.logs import setup_logging
from switchyard.shared.service import run_until_signal
from switchyard.shared.settings import load_settings

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
        self.outbox = Outbox(self.producer, self.service)
        self.pipeline = Pipeline(provider, self.adapter, config, self.pacer, self.client, self.cancels, self.outbox,
                                 self._no_return)
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
            # While calls run or offsets wait to be committed, look again every 100 ms; an idle worker waits for
            # messages alone (ten wake-ups a second, for nothing, were a quarter of its idle CPU).
            busy = self._in_flight[False] or self._in_flight[True] or self.tracker.committable()
            batches = await self.consumer.getmany(timeout_ms=100 if busy else 1000, max_records=FETCH_MAX)
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
                acks = await self.pipeline.handle(raw)
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
            await (await self.outbox.reply_error(env, err))
        except KafkaError:
            raise
        except Exception:
            log.exception("dropping a request that can be neither answered nor dead-lettered",
                          extra={"request_id": env.id})



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
    gc_settings.freeze_startup_objects()
    uvloop.run(serve(args))
