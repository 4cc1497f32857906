"""Every Kafka topic name, partition count and header key, defined once.

Services never spell a topic name themselves: they import it from here, so a
rename is one line and `switchyard up` / deploy/ create exactly these topics.
"""

from __future__ import annotations

import os

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


PARTITIONS_ENV = "SWITCHYARD_PARTITIONS"
"""Where set, the most partitions any topic is created with (`switchyard up`, `switchyard topics create`).

Every consumer pays for each partition it holds on every fetch: aiokafka names them all in each fetch request
(it has no incremental fetch sessions), and the broker answers for each. With a message per fetch, one
consumer holding 16 partitions cost about 820 µs of its own CPU and 1.3-1.7 ms of the broker's per message,
against 600 and 1.2 ms with 4 or one (bench/README.md). A topic needs no more partitions than the stage that
consumes it has processes."""

CONSUMING_STAGE: dict[str, str] = {REQUESTS: "router", REPLIES: "ingress", USAGE: "accounting",
                                   PROMPTS: "accounting"}
"""The `switchyard up` stage whose processes share each group-consumed topic (provider topics: "worker").
Every other topic is read whole by every process that reads it, so more partitions only cost."""


def most_partitions() -> int | None:
    """SWITCHYARD_PARTITIONS (a positive integer), or None where it is not set."""
    value = os.environ.get(PARTITIONS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{PARTITIONS_ENV} must be a positive integer, not {value!r}")
    return int(value)


def all_topics(providers: list[str], most: int | None = None) -> dict[str, int]:
    """Every topic a stack serving `providers` needs, with its partition count: at most `most`, where given."""
    topics = dict(PARTITIONS)
    for provider in providers:
        topics[provider_topic(provider)] = PROVIDER_PARTITIONS
        topics[provider_topic(provider, batch=True)] = PROVIDER_PARTITIONS
    if most is not None:
        topics = {name: min(count, most) for name, count in topics.items()}
    return topics


def stack_topics(providers: list[str], replicas: dict[str, int]) -> dict[str, int]:
    """The topics of a stack whose stages run `replicas` processes each: a topic gets one partition per process
    of the stage that consumes it (at most its count above), and a topic read whole gets one."""
    sized = {}
    for name, count in all_topics(providers).items():
        stage = "worker" if name.startswith(PROVIDER_PREFIX) else CONSUMING_STAGE.get(name)
        sized[name] = min(count, replicas[stage]) if stage is not None else 1
    return sized


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
