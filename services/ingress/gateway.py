"""The state one ingress process holds, and what every route asks of it.

Kafka clients (the producer and this replica's reply listener), the virtual keys, limits and budget holds,
guardrails and the response cache. A route authenticates through it (`authenticate`), admits a request against
the replica's and the key's limits (`admit`, undone by exactly one `finish`) and submits the envelope (`submit`:
registered for its reply before it is written, so no reply can arrive unheard).

PostgreSQL is optional at run time: ingress starts and serves the master key without it, loads the virtual keys
in the background until it answers (`ready` waits for them), limits keys on its own count while it is down, and
answers admin calls that need it with a 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from fastapi import Request

from switchyard.services.ingress.admission import InFlightCap, max_timeout_s, timeout_s
from switchyard.services.ingress.auth import MASTER, AuthFailures, Identity, bearer_token, is_master
from switchyard.services.ingress.batch_driver import BatchDriver
from switchyard.services.ingress.budget_holds import BudgetHolds, Hold
from switchyard.services.ingress.cache import ResponseCache
from switchyard.services.ingress.database import DATABASE_ERRORS, admin_database, request_database
from switchyard.services.ingress.first_attempt import FirstAttempt
from switchyard.services.ingress.guarding import RequestGuard
from switchyard.services.ingress.hold import AdmissionHold
from switchyard.services.ingress.keys import KEY_PREFIX, REFRESH_S, KeyStore, key_hash_secret
from switchyard.services.ingress.limits import RateLimiter
from switchyard.services.ingress.replies import Pending, ReplyListener
from switchyard.services.ingress.ui.session import session_identity
from switchyard.shared import retry, topics, tracing
from switchyard.shared.config_schema import GatewayConfig
from switchyard.shared.contracts import CancelRequest, KeyEvent, RequestEnvelope, now_ms
from switchyard.shared.errors import GatewayError
from switchyard.shared.guardrails import Guardrails
from switchyard.shared.kafka import make_consumer, make_producer, start_client, topic_partitions
from switchyard.shared.kafka_delivery import encode, send, send_and_wait
from switchyard.shared.kafka_destinations import DeliveryRefused
from switchyard.shared.pg import Database
from switchyard.shared.prompt_log import PromptRecord
from switchyard.shared.routing import undeliverable
from switchyard.shared.service import BackgroundTasks
from switchyard.shared.settings import Settings
from switchyard.shared.tansu import is_tansu
from switchyard.shared.tokens import estimate_total_tokens

log = logging.getLogger("switchyard.ingress")

DEFAULT_TIMEOUT_S = float(os.environ.get("SWITCHYARD_REQUEST_TIMEOUT", "300"))
KEY_LOAD_RETRY_S = (0.5, 4.0)
"""Backoff between attempts to load the virtual keys while PostgreSQL does not answer (first, most)."""
KEY_LOAD_TIMEOUT_S = 30.0
PUBLISH_DRAIN_S = 5.0
"""How long a stopping ingress waits for its prompt-log records and cancel requests to reach the broker."""


class Gateway:
    """The state one ingress process holds: Kafka clients, the reply listener, config."""

    producer: AIOKafkaProducer
    replies: ReplyListener
    cache: ResponseCache

    def __init__(self, settings: Settings, config: GatewayConfig, reply_partition: int) -> None:
        self.settings = settings
        self.config = config
        self.reply_partition = reply_partition
        self._database: Database | None = None
        self._request_database: Database | None = None
        self.keys: KeyStore | None = None
        self.limiter: RateLimiter | None = None
        self.budget_holds: BudgetHolds | None = None
        self.in_flight = InFlightCap()
        self.auth_failures = AuthFailures()
        self.max_timeout_s = max_timeout_s()
        self._tasks: list[asyncio.Task[None]] = []
        self._background = BackgroundTasks()
        """Prompt-log records and cancel requests on their way to the broker (drained before the producer stops)."""
        self.batch_driver: BatchDriver | None = None
        self.hold = AdmissionHold()
        """Held by `switchyard up` while it rotates the Tansu broker (services/ingress/hold.py)."""
        if is_tansu():
            self.hold.install()
        self.guardrails = Guardrails(config.guardrails)
        self.first_attempt = FirstAttempt(settings.bootstrap_servers, config)

    def guard(self, identity: Identity, model: str) -> RequestGuard:
        """The guardrails of a request (the model group's and the key's) and whether its prompt is logged."""
        group = self.config.group(model)
        log_prompts = next(v for v in (identity.log_prompts, group.log_prompts if group else None,
                                       self.config.logging.prompts) if v is not None)
        return RequestGuard(self.guardrails.select(model, identity.guardrails), log_prompts)

    def publish_record(self, record: PromptRecord | None) -> None:
        """Hand a request's (redacted) prompt-log record to the producer; its failure is logged, never raised."""
        if record is not None:
            self._publish_soon(topics.PROMPTS, encode(record), record.request_id, "a prompt-log record")

    def publish_cancel(self, request_id: str) -> None:
        """Ask the workers to stop the provider call of `request_id` (its client is gone); never blocks, its
        failure is logged, never raised: a call not cancelled only runs to its end, as before."""
        self._publish_soon(topics.CANCEL, encode(CancelRequest(request_id=request_id)), request_id,
                           "a cancel request")

    def _publish_soon(self, topic: str, value: bytes, request_id: str, what: str) -> None:
        """Send one message keyed by `request_id` in the background (the response path never waits for it)."""

        async def publish() -> None:
            try:
                await send_and_wait(self.producer, topic, value, key=request_id.encode())
            except Exception as e:
                log.warning(f"could not publish {what}", extra={"request_id": request_id, "error": repr(e)[:300]})

        self._background.spawn(publish())

    async def start(self) -> None:
        # aiokafka clients must be created inside the running event loop.
        self.producer = make_producer(self.settings.bootstrap_servers)
        self.replies = ReplyListener(self.settings.bootstrap_servers, topics.REPLIES, self.reply_partition)
        await start_client(self.producer, "ingress-producer")
        await self.first_attempt.start()
        self.cache = ResponseCache(self.config, self.settings.database_url, self)
        self.cache.start()
        if self.settings.database_url:
            # Nothing here waits for PostgreSQL: the keys load in the background (see `ready`).
            self.keys = KeyStore(self.database(), key_hash_secret(self.settings),
                                 request_database=self.request_database())
            self.limiter = RateLimiter(self.request_database())
            self.budget_holds = BudgetHolds(self.request_database(), self.config)
            self._tasks.append(asyncio.create_task(self._follow_key_events()))
            self._tasks.append(asyncio.create_task(self._keep_keys_loaded()))
            self.batch_driver = BatchDriver(self)
            self._tasks.append(asyncio.create_task(self.batch_driver.run()))
        await self.replies.start()

    @property
    def ready(self) -> bool:
        """Replies are flowing and, with a database, the virtual keys have been loaded once."""
        return hasattr(self, "replies") and self.replies.ready and (self.keys is None or self.keys.loaded)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.replies.stop()
        await self.first_attempt.stop()
        await self.cache.close()
        with contextlib.suppress(TimeoutError):  # a broker that is gone cannot hold the shutdown
            await asyncio.wait_for(self._background.drain(), PUBLISH_DRAIN_S)
        await self.producer.stop()
        for database in (self._database, self._request_database):
            if database is not None:
                await database.close()

    def database(self) -> Database:
        """The pool of the admin API and key loading (longer timeouts)."""
        if not self.settings.database_url:
            raise GatewayError(503, "No accounting database is configured (DATABASE_URL).", code="no_database")
        if self._database is None:
            self._database = admin_database(self.settings.database_url)
        return self._database

    def request_database(self) -> Database:
        """The pool of the request path, with short timeouts (a failure there degrades, never waits long)."""
        if self._request_database is None:
            self.database()  # the same 503 without a DATABASE_URL
            self._request_database = request_database(self.settings.database_url)
        return self._request_database

    async def _keep_keys_loaded(self) -> None:
        """Load the virtual keys now, then every REFRESH_S; each load is retried until PostgreSQL answers.

        An outage logs one warning when it starts and one when PostgreSQL answers again (`DatabaseOutage`),
        not one per attempt; keys already loaded keep working meanwhile."""
        store = self.key_store()
        while True:
            first = not store.loaded
            await self._load_keys(store)
            if first or store.outage.down:
                log.info("virtual keys loaded", extra={"keys": len(store.by_id)})
            store.outage.recovered()
            await asyncio.sleep(REFRESH_S)

    @staticmethod
    async def _load_keys(store: KeyStore) -> None:
        """Load every key, retried after KEY_LOAD_RETRY_S[0] doubling to KEY_LOAD_RETRY_S[1] until it succeeds
        (shared/retry.py); an error that is no database error is logged with its traceback and retried too."""
        async for attempt in retry.attempts(Exception, first_s=KEY_LOAD_RETRY_S[0], max_s=KEY_LOAD_RETRY_S[1]):
            with attempt:
                try:
                    await asyncio.wait_for(store.load_all(), KEY_LOAD_TIMEOUT_S)
                except DATABASE_ERRORS as e:
                    store.outage.failed(e)  # warns only when the outage starts
                    raise
                except Exception:
                    log.exception("could not load the virtual keys")
                    raise

    def key_store(self) -> KeyStore:
        if self.keys is None:
            raise GatewayError(503, "Virtual keys need the database (DATABASE_URL).", code="no_database")
        return self.keys

    async def _follow_key_events(self) -> None:
        """Apply key changes from every replica (and budget blocks from accounting) within milliseconds."""
        consumer = make_consumer(bootstrap=self.settings.bootstrap_servers, group_id=None, tansu_fetch_wait_ms=50,
                                 auto_offset_reset="latest")
        await start_client(consumer, "ingress-keys")
        parts = await topic_partitions(consumer, topics.KEYS)
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        try:
                            await self.key_store().apply(KeyEvent.model_validate_json(record.value))
                        except Exception:
                            log.exception("could not apply key event")
                self.key_store().note_poll()
        finally:
            await consumer.stop()

    async def publish_key_event(self, event: KeyEvent) -> None:
        async with self.hold.admitted():
            await send_and_wait(self.producer, topics.KEYS, encode(event), key=event.key_id.encode())

    async def authenticate(self, request: Request) -> Identity:
        """The caller's identity; failures are counted and throttled per client address (AuthFailures)."""
        address = request.client.host if request.client else "unknown"
        self.auth_failures.check(address)
        try:
            return await self._authenticate(request)
        except GatewayError as e:
            if e.status == 401 and e.code != "missing_api_key":  # a token was offered, and it was wrong
                self.auth_failures.failed(address, e, request.url.path)
            raise

    async def _authenticate(self, request: Request) -> Identity:
        if (session := session_identity(request, self.settings.master_key)) is not None:  # the dashboard's cookie
            return session
        token = bearer_token(request.headers.get("authorization"), request.headers.get("x-api-key"))
        if is_master(token, self.settings.master_key):
            return Identity(key_id=MASTER, is_master=True)
        if self.keys is None or not token.startswith(KEY_PREFIX):
            raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
        return (await self.keys.authenticate(token)).identity()

    async def authenticate_admin(self, request: Request) -> None:
        if not (await self.authenticate(request)).is_master:
            raise GatewayError(403, "This endpoint needs the master key.", code="forbidden")

    async def admit(self, request: Request, identity: Identity, body: dict[str, Any]) -> Admitted:
        """Apply the replica's and the key's limits and hold the budgets; returns what to correct and release
        later. Headers go on the response. Whatever it takes is given back by exactly one `finish` (and nothing
        when it raises)."""
        self.in_flight.enter()
        try:
            tokens = await self._admit_key(request, identity, body)
        except BaseException:
            self.in_flight.leave()
            raise
        try:
            hold = None if self.budget_holds is None else await self.budget_holds.reserve(
                identity, str(body.get("model") or ""), body)
        except BaseException:
            self.finish(identity, Admitted(tokens), None)
            raise
        return Admitted(tokens, hold)

    async def _admit_key(self, request: Request, identity: Identity, body: dict[str, Any]) -> int:
        if self.limiter is None or identity.is_master:
            return 0
        headers: dict[str, str] = request.state.extra_headers
        estimate = estimate_total_tokens(body)
        for kind, limit, amount in (("requests", identity.rpm, 1), ("tokens", identity.tpm, estimate)):
            if limit:
                try:
                    allowance = await self.limiter.take(identity.key_id, kind, limit, amount)
                except GatewayError as e:
                    headers.update(e.headers)
                    raise
                headers.update(self.limiter.headers(kind, limit, allowance))
        self.limiter.enter(identity.key_id, identity.max_parallel)
        return estimate

    def finish(self, identity: Identity, admitted: Admitted, actual_tokens: int | None) -> None:
        self.in_flight.leave()
        if self.budget_holds is not None:
            self.budget_holds.settle(admitted.hold)
        if self.limiter is None or identity.is_master:
            return
        self.limiter.leave(identity.key_id)
        if identity.tpm and actual_tokens is not None:
            self.limiter.correct(identity.key_id, actual_tokens - admitted.tokens)

    def route_headers(self, request: Request) -> dict[str, str]:
        """Only the headers routing rules look at travel in the envelope (never credentials)."""
        names = {name.lower() for rule in self.config.routing_rules for name in rule.headers}
        return {name: request.headers[name] for name in names if name in request.headers}

    def deadline_ms(self, request: Request) -> int:
        """Now plus `x-switchyard-timeout` (else the default), capped by SWITCHYARD_MAX_TIMEOUT; 400 when bad."""
        timeout = timeout_s(request.headers.get(topics.HEADER_TIMEOUT), DEFAULT_TIMEOUT_S, self.max_timeout_s)
        return now_ms() + int(timeout * 1000)

    async def submit(self, envelope: RequestEnvelope, trace: tracing.Hop | None = None) -> Pending:
        """Route the first attempt (services/ingress/first_attempt.py), register for the reply, then write the
        envelope to its provider's topic (with the decision's trace context) and wait for the broker's
        acknowledgement. Routing's refusal is raised before anything is written."""
        topic, route = self.first_attempt.route(envelope, trace)
        value = encode(envelope)  # before the try: a body that cannot be encoded is not a broker outage
        async with self.hold.admitted():  # waits while `switchyard up` rotates the Tansu broker
            pending = self.replies.register(envelope.id)
        try:
            fut = await send(self.producer, topic, value, key=envelope.id.encode(), headers=route.headers())
            await fut
        except DeliveryRefused as refused:  # e.g. a provider topic that takes less than the body
            self.replies.unregister(envelope.id)
            raise undeliverable(refused) from None
        except Exception as e:
            self.replies.unregister(envelope.id)
            log.error("could not enqueue request", extra={"request_id": envelope.id, "error": repr(e)})
            raise GatewayError(503, "The gateway could not accept the request (message broker unavailable).",
                               code="broker_unavailable") from e
        return pending


@dataclass(frozen=True)
class Admitted:
    """What `Gateway.admit` took for one request: its token estimate (corrected later) and its budget hold."""

    tokens: int
    hold: Hold | None = None

