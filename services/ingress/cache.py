"""The response cache, on ingress: an answer found here never reaches Kafka, a router or a provider.

For a request to a model group with `cache: true`, `lookup` decides (and says in `x-switchyard-cache`):
- `bypass`: `Cache-Control: no-cache` (no lookup; the answer is stored) or `no-store` (neither);
- `hit`: an entry of the caller's scope with the same exact key, younger than `max-age` and unexpired;
- `semantic-hit`: with `cache.semantic`, the last user message is embedded through Switchyard's own
  pipeline (an `embeddings` request to `cache.semantic.embedding_model`, billed to the caller's key) and an
  entry of the same context is at least `threshold` similar (`x-switchyard-cache-similarity`);
- `miss`: otherwise, and whenever the store is down, slow (`cache.lookup_timeout_s`) or the embedding fails:
  the cache never fails a request.

A hit is answered from the entry (cache_replay.py) and published to `llm.usage` as a row with cost 0,
`cache_hit` true and the cost its provider call had as saved. A miss is recorded on its way to the caller and,
if it ended well, stored in the background (errors never are); an entry is visible to every replica as
soon as its INSERT commits. A background sweep keeps the store within its bounds (cache_store.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer

from switchyard.services.ingress.auth import Identity
from switchyard.services.ingress.cache_keys import CacheControl, cache_control, exact_key, scope, semantic_parts
from switchyard.services.ingress.cache_replay import RecordingPending, ReplayPending, replies_for
from switchyard.services.ingress.cache_store import CacheStore, unit
from switchyard.services.ingress.database import DATABASE_ERRORS, DatabaseOutage, request_database
from switchyard.services.ingress.replies import Pending, ReplyListener
from switchyard.shared import topics
from switchyard.shared.config_schema import GatewayConfig, ModelGroup
from switchyard.shared.contracts import Reply, RequestEnvelope, Usage, UsageEvent, now_ms
from switchyard.shared.kafka_delivery import encode, send
from switchyard.shared.metrics import CACHE_REQUESTS
from switchyard.shared.pg import Database

log = logging.getLogger("switchyard.ingress.cache")

EMBED_TIMEOUT_S = 10.0
"""The longest a semantic lookup waits for its embedding (never past the request's own deadline)."""
SWEEP_EVERY_S = 30.0
MAX_PENDING_WRITES = 256
"""Stores in flight at most; past it a new answer is not stored (counted in `skipped_writes`)."""


class Pipeline(Protocol):
    """What the cache needs of the ingress gateway: submitting an envelope and the reply listener."""

    reply_partition: int
    replies: ReplyListener
    producer: AIOKafkaProducer

    async def submit(self, envelope: RequestEnvelope) -> Pending: ...


@dataclass
class Lookup:
    """The cache's decision for one request: `status` for the header, `pending` when it is a hit."""

    status: str
    similarity: float | None = None
    pending: Pending | None = None
    store: dict[str, Any] | None = None
    """Where a miss is stored (scope, keys, vector, ttl), or None when it must not be."""
    entry: dict[str, Any] | None = None
    """The entry a hit is answered from."""
    headers: dict[str, str] = field(default_factory=dict)


class ResponseCache:
    """One per ingress process; without a DATABASE_URL (or with no group opting in) it has no store and
    every cacheable request is a miss."""

    def __init__(self, config: GatewayConfig, database_url: str, pipeline: Pipeline) -> None:
        self.config = config.cache
        self.gateway_config = config
        wanted = bool(database_url) and any(m.cache for m in config.models)
        # Its own small pool with the request path's short timeouts: cache traffic never starves key lookups.
        self.database: Database | None = request_database(database_url) if wanted else None
        self.store = CacheStore(self.database, config.cache) if self.database is not None else None
        self.pipeline = pipeline
        self.outage = DatabaseOutage(log, "the response cache", "every cacheable request is a miss")
        self._writes: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.skipped_writes = 0

    def start(self) -> None:
        if self.store is not None:
            self._sweeper = asyncio.create_task(self.sweep_forever())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._writes:  # entries and hit usage on their way: give them a moment to land
            await asyncio.wait(list(self._writes), timeout=2.0)
        if self.database is not None:
            await self.database.close()

    def enabled(self, model: str) -> bool:
        group = self.gateway_config.group(model)
        return group is not None and group.cache

    async def lookup(self, headers: Mapping[str, str], identity: Identity, envelope: RequestEnvelope) -> Lookup:
        """Decide hit, semantic hit, miss or bypass; headers for the response are in `Lookup.headers`."""
        group = self.gateway_config.group(envelope.model)
        assert group is not None
        control = cache_control(headers.get(topics.HEADER_CACHE_CONTROL))
        started = time.perf_counter()
        try:
            found = await self._find(identity, envelope, group, control)
        except Exception:  # a bug or an unreadable entry: the request goes on as a miss, never fails here
            log.exception("cache lookup failed; answering as a miss", extra={"request_id": envelope.id})
            found = Lookup("miss")
        if isinstance(found.pending, ReplayPending):  # the usage row is written when the hit is served
            latency_ms = (time.perf_counter() - started) * 1000
            found.pending.on_served = lambda: self._publish_hit(identity, envelope, found, latency_ms)
        found.headers[topics.HEADER_CACHE] = found.status
        CACHE_REQUESTS.labels(found.status).inc()
        if found.similarity is not None:
            found.headers[topics.HEADER_CACHE_SIMILARITY] = f"{found.similarity:.4f}"
        return found

    async def _find(self, identity: Identity, envelope: RequestEnvelope, group: ModelGroup,
                    control: CacheControl) -> Lookup:
        where: dict[str, Any] = {"scope": scope(identity), "key": exact_key(envelope.kind, envelope.model,
                                                                            envelope.body),
                                 "semantic_key": None, "vector": None, "model_group": group.name,
                                 "ttl_s": group.cache_ttl_s or self.config.ttl_s}
        status = "miss" if control.lookup else "bypass"
        if not control.lookup:
            return Lookup(status, store=where if control.store else None)
        entry = await self._guarded(self.store.get_exact(where["scope"], where["key"], control.max_age_s)
                                    if self.store else None)
        if entry is not None:
            return self._hit("hit", entry.entry, envelope)
        semantic = self.config.semantic
        parts = semantic_parts(envelope.kind, envelope.model, envelope.body, semantic.embedding_model) \
            if semantic else None
        if semantic and parts and self.store is not None and not self.outage.down:
            vector = await self._embed(identity, envelope, parts[1])
            if vector is not None:
                where["semantic_key"], where["vector"] = parts[0], vector
                near = await self._guarded(self.store.get_semantic(where["scope"], parts[0], vector,
                                                                   semantic.threshold, control.max_age_s))
                if near is not None:
                    return self._hit("semantic-hit", near.entry, envelope, near.similarity)
        return Lookup(status, store=where if control.store else None)

    def _hit(self, status: str, entry: dict[str, Any], envelope: RequestEnvelope,
             similarity: float | None = None) -> Lookup:
        include_usage = bool((envelope.body.get("stream_options") or {}).get("include_usage"))
        replies = replies_for(entry, envelope.id, envelope.stream, include_usage)
        return Lookup(status, similarity, ReplayPending(replies), entry=entry)

    async def _guarded(self, call: Any) -> Any:
        """Run a store call unless the store is known down; any failure or slowness is a miss, never an error."""
        if call is None:
            return None
        if not self.outage.may_try():
            call.close()
            return None
        try:
            result = await asyncio.wait_for(call, self.config.lookup_timeout_s)
        except DATABASE_ERRORS as e:
            self.outage.failed(e)
            return None
        self.outage.recovered()
        return result

    async def _embed(self, identity: Identity, envelope: RequestEnvelope, text: str) -> list[float] | None:
        """The unit vector of `text` from the embedding model group, through the normal pipeline; None on
        any failure (then the request is matched exactly only)."""
        semantic = self.config.semantic
        assert semantic is not None
        model = semantic.embedding_model
        deadline = min(envelope.deadline_ms, now_ms() + int(EMBED_TIMEOUT_S * 1000))
        request = RequestEnvelope(
            id=f"{envelope.id}-cache-{uuid.uuid4().hex[:8]}", kind="embeddings", model=model,
            body={"model": model, "input": text}, reply_topic=topics.REPLIES,
            reply_partition=self.pipeline.reply_partition, deadline_ms=deadline, key_id=identity.key_id,
            metadata={**identity.metadata, "switchyard_cache": "embedding"})
        try:
            pending = await self.pipeline.submit(request)
        except Exception as e:
            log.warning("cache embedding not submitted", extra={"request_id": envelope.id, "error": repr(e)[:200]})
            return None
        try:
            reply = await pending.next((deadline - now_ms()) / 1000.0)
        except TimeoutError:
            log.warning("cache embedding timed out", extra={"request_id": envelope.id, "model": model})
            return None
        finally:
            self.pipeline.replies.unregister(request.id)
        return _vector_of(reply, envelope.id)

    def recording(self, pending: Pending, lookup: Lookup) -> Pending:
        """`pending`, recorded so that an answer that ends well is stored where `lookup` says."""
        where = lookup.store
        if where is None or self.store is None:
            return pending

        def complete(answer: dict[str, Any], chunks: list[dict[str, Any]] | None, last: Reply) -> None:
            self._write(where, _entry(self.gateway_config, answer, chunks, last))

        return RecordingPending(pending, complete)

    def _write(self, where: dict[str, Any], entry: dict[str, Any]) -> None:
        if self.store is None or len(self._writes) >= MAX_PENDING_WRITES or self.outage.down:
            self.skipped_writes += 1
            return
        task = asyncio.create_task(self._put(where, entry))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, where: dict[str, Any], entry: dict[str, Any]) -> None:
        assert self.store is not None
        try:
            await self.store.put(where["scope"], where["key"], where["semantic_key"], where["vector"],
                                 where["model_group"], where["ttl_s"], entry)
        except DATABASE_ERRORS as e:
            self.outage.failed(e)
        except Exception:
            log.exception("could not store a cache entry")

    def _publish_hit(self, identity: Identity, envelope: RequestEnvelope, found: Lookup, latency_ms: float) -> None:
        """The hit's usage row: cost 0, `cache_hit`, and what the entry's provider call cost as saved."""
        entry = found.entry or {}
        event = UsageEvent(
            event_id=f"cache-{envelope.id}", request_id=envelope.id, attempt=0, kind=envelope.kind,
            provider=entry.get("provider") or "cache", deployment=entry.get("deployment") or "cache",
            model_group=envelope.model, provider_model=entry.get("provider_model") or "", key_id=identity.key_id,
            metadata=identity.metadata, usage=_usage(entry.get("response", {}).get("usage")),
            stream=envelope.stream, latency_ms=latency_ms, cache_hit=True)
        task = asyncio.create_task(self._send_usage(event))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _send_usage(self, event: UsageEvent) -> None:
        try:
            fut = await send(self.pipeline.producer, topics.USAGE, encode(event), key=event.request_id.encode())
            await fut
        except Exception as e:
            log.error("could not record a cache hit's usage", extra={"request_id": event.request_id,
                                                                      "error": repr(e)[:200]})

    async def sweep_forever(self) -> None:
        """Keep the store within its bounds: expired entries and the oldest past `max_entries` go."""
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            if self.store is None or not self.outage.may_try():
                continue
            try:
                removed = await self.store.sweep()
            except DATABASE_ERRORS as e:
                self.outage.failed(e)
                continue
            except Exception:
                log.exception("cache sweep failed")
                continue
            if removed:
                log.info("cache entries removed", extra={"removed": removed})


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    prompt, completion = raw.get("prompt_tokens_details") or {}, raw.get("completion_tokens_details") or {}
    return Usage(prompt_tokens=int(raw.get("prompt_tokens") or 0),
                 completion_tokens=int(raw.get("completion_tokens") or 0),
                 cached_tokens=int(prompt.get("cached_tokens") or 0),
                 reasoning_tokens=int(completion.get("reasoning_tokens") or 0))


def _entry(config: GatewayConfig, answer: dict[str, Any], chunks: list[dict[str, Any]] | None,
           last: Reply) -> dict[str, Any]:
    """What is stored: the answer, a stream's chunks, and the deployment that produced it (to price savings)."""
    route = dict(part.strip().split("=", 1) for part in last.headers.get(topics.HEADER_ROUTE, "").split(";")
                 if "=" in part)
    deployment = config.deployment(route.get("deployment", ""))
    return {"response": answer, "chunks": chunks, "deployment": route.get("deployment"),
            "provider": deployment.provider if deployment else None,
            "provider_model": deployment.model if deployment else None}


def _vector_of(reply: Reply, request_id: str) -> list[float] | None:
    try:
        if reply.type != "response" or reply.status != 200:
            raise ValueError(f"an {reply.type} reply ({reply.status})")
        raw = (reply.data or {})["data"][0]["embedding"]
        vector = [float(x) for x in raw]
        if not all(math.isfinite(x) for x in vector):
            raise ValueError("not finite")
    except (KeyError, IndexError, TypeError, ValueError) as e:
        log.warning("cache embedding unusable", extra={"request_id": request_id, "error": repr(e)[:200]})
        return None
    return unit(vector)
