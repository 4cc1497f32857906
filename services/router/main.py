"""`switchyard router`: consume `llm.requests`, pick a deployment, publish to its provider topic.

What arrives here is every attempt ingress did not route itself: a failed attempt coming back with its history,
and batch envelopes (the Batches API's lines and batch producers'). Ingress routes an interactive request's
first attempt by the same rules over the same health (services/ingress/first_attempt.py).

Health comes from `llm.events` (read in full by every replica, from two minutes back on
start, and caught up before the first request is routed), so routers hold no state that
another replica lacks. Offsets are committed after every message of a batch has been
acknowledged downstream, and when the group takes partitions away (a rebalance ends no loop:
what was not committed is redelivered, and duplicates are dropped downstream by id).

An envelope's reply destination is checked before anything else: one naming a reply topic or
partition that does not exist has nowhere to be answered, so it goes to the dead letters
(`llm.dead`, shared/dead.py) with the reason, to be replayed once the topic exists. An envelope
that does not validate (a batch producer's) is answered with a 400 where its id and reply topic
can be read, else dead-lettered (shared/answers.py); one whose body nests deeper than ingress
allows is answered with ingress's 400, before any provider call.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from switchyard.shared import gc_settings, metrics, topics, tracing
from switchyard.shared.answers import answer, refuse_unreadable
from switchyard.shared.breaker import BreakerSettings, HealthBook
from switchyard.shared.config import load_config
from switchyard.shared.config_schema import GatewayConfig
from switchyard.shared.contracts import ENVELOPE_VERSION, RequestEnvelope, now_ms
from switchyard.shared.dead import bury
from switchyard.shared.errors import GatewayError, nesting_error, timeout_error
from switchyard.shared.health import serve_health
from switchyard.shared.health_feed import RETRY_WAIT_MS, HealthFeed
from switchyard.shared.kafka import group_instance_id, make_consumer, make_producer, start_client
from switchyard.shared.kafka_delivery import check_destination, encode, send_and_wait
from switchyard.shared.kafka_destinations import DeliveryRefused
from switchyard.shared.kafka_offsets import BatchOffsets
from switchyard.shared.lag import follow_lag
from switchyard.shared.logs import setup_logging
from switchyard.shared.routing import route, undeliverable
from switchyard.shared.service import run_until_signal
from switchyard.shared.settings import load_settings

log = logging.getLogger("switchyard.router")
SERVICE = "router"
COMMIT_INTERVAL_S = 0.2


class Router:
    def __init__(self, bootstrap: str, config: GatewayConfig) -> None:
        self.config = config
        self.health = HealthBook(BreakerSettings.from_env())
        self.rng = random.Random()
        self.producer: AIOKafkaProducer = make_producer(bootstrap)
        self.requests: AIOKafkaConsumer = make_consumer(bootstrap=bootstrap, group_id=topics.ROUTER_GROUP,
                                                       group_instance_id=group_instance_id(topics.ROUTER_GROUP))
        self.offsets = BatchOffsets(self.requests)
        self.feed = HealthFeed(bootstrap, self.health, "router-events", wait_ms=RETRY_WAIT_MS)
        self.ready = False

    async def start(self) -> None:
        await start_client(self.producer, "router-producer")
        await self.feed.start()
        await start_client(self.requests, "router-requests")
        self.requests.subscribe([topics.REQUESTS], listener=self.offsets)

    async def stop(self) -> None:
        await self.requests.stop()
        await self.feed.stop()
        await self.producer.stop()

    async def follow_events(self) -> None:
        await self.feed.follow()

    async def route_forever(self) -> None:
        """Route batch after batch; commit at most every COMMIT_INTERVAL_S (and when the topic goes quiet).

        Every routed message is acknowledged downstream before its batch's offsets may be committed,
        so a crash only redelivers (at least once); committing each batch cost a broker round trip
        per batch, which at low load is one per request.
        """
        loop = asyncio.get_running_loop()
        last_commit = loop.time()
        while True:
            dirty = self.offsets.dirty
            batches = await self.requests.getmany(timeout_ms=100 if dirty else 1000, max_records=500)
            self.ready = True
            if batches:
                self.offsets.begin(batches)
                await asyncio.gather(*(self.route(record) for records in batches.values() for record in records))
                self.offsets.done()
            if self.offsets.dirty and (not batches or loop.time() - last_commit >= COMMIT_INTERVAL_S):
                await self.offsets.commit()
                last_commit = loop.time()

    def export_states(self) -> None:
        """Set `switchyard_deployment_state` for every configured deployment (run at scrape time)."""
        now = now_ms() / 1000.0
        for group in self.config.models:
            for dep in group.deployments:
                health = self.health.deployments.get(dep.id)
                state = health.state(now) if health is not None else "closed"
                metrics.DEPLOYMENT_STATE.labels(dep.id).set(metrics.BREAKER_STATES[state])

    async def route(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Route one envelope, or answer it, or dead-letter it; returns once that is acknowledged.

        The decision is a span (child of the hop that produced the envelope, after a span for its wait in
        llm.requests), and whatever the router produces for it carries that span's trace context."""
        parent = tracing.from_record(record.headers)
        tracing.wait_in_topic(record.topic, parent, record.timestamp)
        hop = tracing.start("route", parent, SpanKind.INTERNAL) if tracing.enabled() else tracing.Hop(None, parent)
        tracing.use(hop.context)
        try:
            await self._route(record, hop)
        except DeliveryRefused as refused:  # not even llm.dead takes it (a cluster without the topic)
            log.error("dropping an envelope that can be neither routed, answered nor dead-lettered",
                      extra={"reason": refused.reason, "error": refused.message, "offset": record.offset})
        finally:
            hop.end()

    async def _route(self, record: ConsumerRecord[bytes, bytes], hop: tracing.Hop) -> None:
        try:
            env = RequestEnvelope.model_validate_json(record.value)
        except ValidationError as e:  # a batch producer's: answered where it can be, else dead-lettered
            await refuse_unreadable(self.producer, record.value or b"", e, service=SERVICE, key=record.key,
                                    headers=list(record.headers or ()))
            return
        try:
            await check_destination(self.producer, env.reply_topic, env.reply_partition)
        except DeliveryRefused as refused:
            # Nowhere to answer it: keep it as it came, for a replay to llm.requests once the topic exists.
            await bury(self.producer, refused, record.value or b"", key=record.key, service=SERVICE,
                       request_id=env.id, headers=record.headers, replay_to=(topics.REQUESTS, None))
            return
        if env.v > ENVELOPE_VERSION:
            return await self.answer(env, GatewayError(500, f"envelope version {env.v} is newer than this router"))
        too_deep = nesting_error(env.body)  # ingress refuses these; a batch producer may not have
        if too_deep is not None:
            return await self.answer(env, too_deep)
        now = now_ms()
        if env.expired(now):
            return await self.answer(env, timeout_error())
        try:
            decision = route(env, self.config, self.health, now, self.rng)
        except GatewayError as e:
            return await self.answer(env, e)
        topic = decision.apply(env)
        hop.set(decision.span_attributes(env))
        try:
            await send_and_wait(self.producer, topic, encode(env), key=env.id.encode(),
                                headers=tracing.current_headers())
        except DeliveryRefused as refused:  # e.g. routing made a batch producer's largest envelope too large
            await self.answer(env, undeliverable(refused))

    async def answer(self, env: RequestEnvelope, err: GatewayError) -> None:
        """The request's terminal answer, from the router: no deployment left, or its deadline passed.
        Dead-lettered if its reply destination vanished since it was checked."""
        await answer(self.producer, env, err, service=SERVICE)


async def serve(args: argparse.Namespace) -> None:
    settings = load_settings()
    router = Router(settings.bootstrap_servers, load_config(args.config))
    tracing.setup_tracing("router")
    await router.start()
    metrics.on_scrape(router.export_states)
    if args.health_port:
        await serve_health(args.health_port, lambda: router.ready)
    log.info("router started")
    await run_until_signal(log, router.follow_events(), router.route_forever(), follow_lag(router.requests, "router"))
    await router.stop()
    tracing.shutdown()


def run(args: argparse.Namespace) -> None:
    import uvloop

    setup_logging("router")
    gc_settings.freeze_startup_objects()
    uvloop.run(serve(args))
