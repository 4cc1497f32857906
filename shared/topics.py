"""Every Kafka topic name, partition count and header key, defined once.

Services never spell a topic name themselves: they import it from here, so a
rename is one line and `switchyard up` / deploy/ create exactly these topics.
"""

from __future__ import annotations

REQUESTS = "llm.requests"
"""Request envelopes from ingress (and batch producers) to the router; failed attempts come back here."""

REPLIES = "llm.replies"
"""Replies to interactive requests; each ingress instance owns one partition."""

EVENTS = "llm.events"
"""Attempt outcomes (ok/error, latency) that every router reads to keep deployment health."""

USAGE = "llm.usage"
"""One usage event per provider call, consumed by accounting."""

KEYS = "llm.keys"
"""Virtual-key changes (revocations, budget blocks) that every ingress replica applies."""

DEAD = "llm.dead"
"""Dead letters: messages the broker can never accept where they were meant to go (too large, no such
topic or partition), each with the DEAD_HEADER_* headers saying why and where (shared/dead.py)."""

CANCEL = "llm.cancel"
"""Cancel signals from ingress when a client goes away before its answer; every worker reads all of them
(no consumer group) and stops the provider call it holds for that request, if any."""

PROMPTS = "llm.prompts"
"""Prompt-log records (already redacted) and guardrail decisions from ingress, stored by accounting."""

PROVIDER_PREFIX = "llm.provider."
BATCH_SUFFIX = ".batch"
BATCH_REPLY_PREFIX = "llm.batch."

PARTITIONS: dict[str, int] = {
    REQUESTS: 16,
    REPLIES: 16,
    EVENTS: 4,
    USAGE: 8,
    KEYS: 1,
    DEAD: 1,
    PROMPTS: 4,
    CANCEL: 1,
}
PROVIDER_PARTITIONS = 16
"""Upper bound on worker processes per provider pool (one consumer per partition)."""

MAX_MESSAGE_BYTES = 16 << 20
"""The largest message any topic accepts: the largest body ingress accepts (8 MiB) as an envelope, with room.

Topics are created with it (`max.message.bytes`), producers may send it and consumers may fetch it.
"""

RETENTION_MS: dict[str, int] = {
    REPLIES: 3_600_000,
    EVENTS: 3_600_000,
    CANCEL: 3_600_000,
    DEAD: 7 * 24 * 3_600_000,
}
"""Per-topic retention where the broker's default does not fit. Replies and events are worthless after an
hour (read within seconds; routers replay two minutes of events), so their logs stay small; dead letters
wait for an operator, so they outlive a long weekend. Every other topic keeps the broker's default."""


def topic_configs(topic: str) -> dict[str, str]:
    """The configuration every gateway topic is created with (`switchyard up`, `switchyard topics create`)."""
    configs = {"max.message.bytes": str(MAX_MESSAGE_BYTES), "compression.type": "producer"}
    if topic in RETENTION_MS:
        configs["retention.ms"] = str(RETENTION_MS[topic])
    return configs


def provider_topic(provider: str, batch: bool = False) -> str:
    """The topic a provider's worker pool consumes; batch traffic has its own, lower-priority topic."""
    return f"{PROVIDER_PREFIX}{provider}{BATCH_SUFFIX if batch else ''}"


def all_topics(providers: list[str]) -> dict[str, int]:
    """Every topic a stack serving `providers` needs, with its partition count."""
    topics = dict(PARTITIONS)
    for provider in providers:
        topics[provider_topic(provider)] = PROVIDER_PARTITIONS
        topics[provider_topic(provider, batch=True)] = PROVIDER_PARTITIONS
    return topics


ROUTER_GROUP = "router"
"""The routers' consumer group (on REQUESTS)."""
ACCOUNTING_GROUP = "accounting"
"""Accounting's consumer group (on USAGE)."""


def worker_group(provider: str) -> str:
    """The consumer group of a provider's worker pool (on its two provider topics)."""
    return f"workers.{provider}"


def consumer_groups(providers: list[str]) -> dict[str, list[str]]:
    """Every consumer group of a stack serving `providers`, with the topics it consumes: what must be caught
    up before nothing acknowledged is left unprocessed (the Tansu rotation checks it)."""
    groups = {ROUTER_GROUP: [REQUESTS], ACCOUNTING_GROUP: [USAGE]}
    for provider in providers:
        groups[worker_group(provider)] = [provider_topic(provider), provider_topic(provider, batch=True)]
    return groups


# Kafka headers of a dead letter on DEAD (values are UTF-8); the message keeps its own key, value and headers.
DEAD_HEADER_REASON = "x-dead-reason"
"""Why it could not be delivered, as a stable code (switchyard.shared.kafka_destinations.REFUSED_*)."""
DEAD_HEADER_ERROR = "x-dead-error"
"""The same, in words (sizes, limits, the missing topic or partition)."""
DEAD_HEADER_TOPIC = "x-dead-topic"
"""Where it was meant to go: the topic a replay sends it to."""
DEAD_HEADER_PARTITION = "x-dead-partition"
"""The partition it was meant for; absent when the key chose it."""
DEAD_HEADER_SERVICE = "x-dead-service"
"""The process that gave up on it (`router`, `worker.openai`, ...)."""
DEAD_HEADER_TS = "x-dead-ts-ms"
"""When it was given up on, in epoch milliseconds."""
DEAD_HEADER_REQUEST_ID = "x-dead-request-id"
"""The request it belongs to."""
DEAD_HEADER_REPLAYED = "x-dead-replayed"
"""On a marker message only (empty value): the id of a dead letter `switchyard dead replay` delivered."""

# HTTP headers Switchyard reads or writes.
HEADER_REQUEST_ID = "x-request-id"
HEADER_ROUTE = "x-switchyard-route"
HEADER_DROPPED_PARAMS = "x-switchyard-dropped-params"
HEADER_TIMEOUT = "x-switchyard-timeout"
HEADER_CACHE = "x-switchyard-cache"
"""On every answer of a cache-enabled group: `hit`, `semantic-hit`, `miss` or `bypass`."""
HEADER_CACHE_SIMILARITY = "x-switchyard-cache-similarity"
"""On a semantic hit: the cosine similarity of the last user message to the stored one."""
HEADER_CACHE_CONTROL = "cache-control"
"""Read on requests: `no-cache` (store, skip the lookup), `no-store` (neither), `max-age=N`."""
HEADER_TRACEPARENT = "traceparent"
"""W3C trace context: read from callers (HTTP) and carried on every Kafka message of a request (shared/tracing.py)."""
HEADER_TRACE_ID = "x-switchyard-trace-id"
"""The request's trace id (32 hex digits), on every ingress response."""
