"""Choosing a deployment for an attempt: content rules, fallback chains, strategies, retries.

Functions of (envelope, config, health, clock) so every router replica decides alike and the
rules are testable without Kafka. The only state they touch is the HealthBook, where a decision
is noted as in flight (least-busy) and takes a half-open deployment's probe; the envelope says whether its
worker announces the call's start to the other replicas (only those two cases need it).

The chain of model groups an attempt may use is rebuilt from the envelope each time (rules,
the context-window check, the group's and the request's fallbacks, and any context-length or
content-policy switch recorded in the history), so any replica can continue any request.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from switchyard.shared import topics
from switchyard.shared.breaker import HealthBook
from switchyard.shared.config_schema import Deployment, GatewayConfig, ModelGroup, RouteRule
from switchyard.shared.contracts import AttemptRecord, NativeFormat, RequestEnvelope
from switchyard.shared.errors import RETRYABLE_STATUSES, GatewayError
from switchyard.shared.kafka_destinations import DeliveryRefused
from switchyard.shared.native import native_required, required_format, speaks
from switchyard.shared.pricing import lookup
from switchyard.shared.tokens import DEFAULT_OUTPUT_TOKENS, estimate_input_tokens, text_of

log = logging.getLogger("switchyard.routing")

MAX_ATTEMPTS = 6
"""Attempts after which a request that has no untried deployment left gets its last error."""
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 8.0
LATENCY_TOLERANCE = 0.1
"""`latency` picks at random among deployments within 10 % of the fastest, so equals share the load."""


@dataclass
class Decision:
    group: ModelGroup
    deployment: Deployment
    not_before_ms: int = 0
    rule: str | None = None
    announce_start: bool = True
    """Whether other replicas must hear when the call begins: it counts for least-busy, or it is a probe."""

    def apply(self, env: RequestEnvelope) -> str:
        """Write the decision into `env` (model group, deployment, not-before, whether its start is announced);
        the provider topic it goes to."""
        env.model_group = self.group.name
        env.deployment = self.deployment.id
        env.not_before_ms = self.not_before_ms
        env.announce_start = self.announce_start
        log.debug("routed", extra={"request_id": env.id, "deployment": env.deployment, "attempt": env.attempt,
                                   "rule": self.rule, "not_before_ms": env.not_before_ms})
        return topics.provider_topic(self.deployment.provider, batch=env.priority == "batch")

    def span_attributes(self, env: RequestEnvelope) -> dict[str, str | int]:
        """What a `route` span says about the decision (never the request's content)."""
        return {"gen_ai.request.model": env.model, "switchyard.model_group": self.group.name,
                "switchyard.deployment": self.deployment.id, "gen_ai.provider.name": self.deployment.provider,
                "switchyard.attempt": env.attempt, "switchyard.request_id": env.id, "switchyard.rule": self.rule or ""}


# ---- request features -------------------------------------------------------------------------


def has_images(body: dict[str, Any]) -> bool:
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ("image_url", "image")
                                             for p in content):
            return True
    return False


def last_user_message(body: dict[str, Any]) -> str:
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            return text_of(m.get("content"))
    return ""


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error as e:
        log.error("routing rule regex does not compile; the rule never matches",
                  extra={"pattern": pattern, "error": str(e)})
        return None


def rule_matches(rule: RouteRule, env: RequestEnvelope) -> bool:
    """All of a rule's conditions hold (a rule without conditions matches everything)."""
    body = env.body
    if rule.models and env.model not in rule.models:
        return False
    body_meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    # The key's own metadata wins: a caller cannot claim another tier, team or project in its body.
    meta = {**{k: str(v) for k, v in (body_meta or {}).items()}, **env.metadata}
    if any(meta.get(k) != v for k, v in rule.metadata.items()):
        return False
    if any(env.route_headers.get(k.lower()) != v for k, v in rule.headers.items()):
        return False
    tokens = estimate_input_tokens(body)
    if rule.min_input_tokens is not None and tokens < rule.min_input_tokens:
        return False
    if rule.max_input_tokens is not None and tokens > rule.max_input_tokens:
        return False
    if rule.has_tools is not None and bool(body.get("tools")) != rule.has_tools:
        return False
    if rule.has_images is not None and has_images(body) != rule.has_images:
        return False
    if rule.last_user_message_regex:
        pattern = _regex(rule.last_user_message_regex)
        if pattern is None or not pattern.search(last_user_message(body)):
            return False
    return True


def allowed(env: RequestEnvelope, group: str) -> bool:
    """The request's key may use `group` (a key without a model list may use any)."""
    return not env.allowed_models or group in env.allowed_models


def first_group(env: RequestEnvelope, config: GatewayConfig) -> tuple[str, str | None]:
    """The model group for a request (the first matching rule's target, else the requested model) and the rule.

    A rule whose target the key may not use does not apply to that key: matching it would hand the
    key another group's deployments (and credentials) that it was never given.
    """
    for i, rule in enumerate(config.routing_rules):
        if allowed(env, rule.route_to) and rule_matches(rule, env):
            return rule.route_to, rule.name or f"rule[{i}]"
    return env.model, None


# ---- the chain of groups ----------------------------------------------------------------------


def _too_small(group: ModelGroup, tokens: int) -> bool:
    """Every deployment has a known context window and the estimate exceeds all of them."""
    windows = [d.context_window for d in group.deployments]
    return all(w is not None for w in windows) and all(tokens > w for w in windows if w is not None)


def _fitting(group: ModelGroup, tokens: int, fmt: NativeFormat | None = None) -> list[Deployment]:
    """The deployments whose window fits the estimate; all of them when none does (the provider decides).
    Only those whose provider speaks `fmt` when the request requires it (shared/native.py)."""
    able = [d for d in group.deployments if speaks(d.provider, fmt)]
    fits = [d for d in able if d.context_window is None or d.context_window >= tokens]
    return fits or able


def _request_fallbacks(env: RequestEnvelope) -> list[str]:
    return [f for f in env.body.get("fallbacks") or [] if isinstance(f, str)]


def _groups(config: GatewayConfig, names: list[str], env: RequestEnvelope) -> list[ModelGroup]:
    """The groups named, once each, leaving out those the request's key may not use."""
    out: list[ModelGroup] = []
    for name in names:
        g = config.group(name)
        if g is not None and g not in out and allowed(env, g.name):
            out.append(g)
    return out


def _special_fallback(group: ModelGroup | None, code: str | None) -> str | None:
    if group is None:
        return None
    if code == "context_length_exceeded":
        return group.context_window_fallback
    if code == "content_filter":
        return group.content_policy_fallback
    return None


def retryable(record: AttemptRecord) -> bool:
    """Connect errors (502), timeouts (408/504), 429 and 5xx: another attempt may succeed. Not a provider
    refusing the gateway's credentials (a 502 `upstream_auth_error`): they fail the same way again."""
    return record.status in RETRYABLE_STATUSES and record.code != "upstream_auth_error"


def chain(env: RequestEnvelope, config: GatewayConfig) -> tuple[list[ModelGroup], str | None]:
    """The model groups this attempt may use, in order, and the rule that chose the first one.

    Raises the request's final error when its last attempt failed in a way no other attempt can fix.
    """
    name, rule = first_group(env, config)
    root = config.group(name)
    if root is None:
        raise GatewayError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found")
    if not allowed(env, root.name):  # ingress refuses this first; a batch producer's envelope may not
        raise GatewayError(403, f"This key may not use the model '{name}'.", param="model",
                           code="model_not_allowed")
    tokens = estimate_input_tokens(env.body)
    if root.context_window_fallback and allowed(env, root.context_window_fallback) and _too_small(root, tokens):
        # Decided before calling: the prompt cannot fit any deployment of this group.
        root = config.group(root.context_window_fallback) or root
    groups = _groups(config, [root.name, *root.fallbacks, *_request_fallbacks(env)], env)

    group_of = {d.id: g.name for g in config.models for d in g.deployments}
    for i, record in enumerate(env.history):
        if retryable(record):
            continue
        failed_in = config.group(group_of.get(record.deployment, ""))
        target = _special_fallback(failed_in, record.code)
        tried = {group_of.get(h.deployment) for h in env.history[: i + 1]}
        target_group = config.group(target) if target else None
        if target_group is None or target_group.name in tried or not allowed(env, target_group.name):
            if i == len(env.history) - 1:
                raise final_error(env)
            continue
        groups = _groups(config, [target_group.name, *target_group.fallbacks, *_request_fallbacks(env)], env)
    return groups, rule


# ---- strategies -------------------------------------------------------------------------------


def _estimated_cost(dep: Deployment, body: dict[str, Any]) -> float:
    price = lookup(dep.provider, dep.model)
    if price is None:
        return float("inf")
    out = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_OUTPUT_TOKENS
    return float(price.input) * estimate_input_tokens(body) + float(price.output) * int(out)


def pick(group: ModelGroup, candidates: list[Deployment], health: HealthBook, env: RequestEnvelope,
         now: float, rng: random.Random) -> Deployment:
    """One of `candidates` (all healthy, none tried by this request) by the group's strategy."""
    if group.strategy == "weighted":
        weights = [d.weight for d in candidates]
        if sum(weights) <= 0:
            return candidates[0]
        return rng.choices(candidates, weights=weights)[0]
    if group.strategy == "latency":
        scores = {d.id: health.latency_score(d.id, env.stream, now) for d in candidates}
        unmeasured = [d for d in candidates if scores[d.id] is None]
        if unmeasured:
            return rng.choice(unmeasured)  # measure it first
        best = min(s for s in scores.values() if s is not None)
        return rng.choice([d for d in candidates if (scores[d.id] or 0.0) <= best * (1 + LATENCY_TOLERANCE)])
    if group.strategy == "cost":
        return min(candidates, key=lambda d: _estimated_cost(d, env.body))
    if group.strategy == "least-busy":
        busy = {d.id: health.in_flight(d.id, now) for d in candidates}
        fewest = min(busy.values())
        return rng.choice([d for d in candidates if busy[d.id] == fewest])
    return candidates[0]


# ---- the decision -----------------------------------------------------------------------------


def backoff_s(attempt: int, rng: random.Random) -> float:
    """Exponential backoff with full jitter."""
    return rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def route(env: RequestEnvelope, config: GatewayConfig, health: HealthBook, now_ms: int,
          rng: random.Random | None = None) -> Decision:
    """`decide`, where a fault inside routing (a bug) is a 500 `routing_error`, logged: a bug must neither leave
    the caller without an answer nor crash-loop a consumer on one message."""
    try:
        return decide(env, config, health, now_ms, rng)
    except GatewayError:
        raise
    except Exception:
        log.exception("routing failed", extra={"request_id": env.id})
        raise GatewayError(500, "The gateway could not route this request.", code="routing_error") from None


def undeliverable(refused: DeliveryRefused) -> GatewayError:
    """The answer to a routed envelope its provider's topic refuses (e.g. too large for it)."""
    return GatewayError(refused.status, f"The request cannot be routed: {refused.message}.", code="delivery_refused",
                        retryable=False)


def decide(env: RequestEnvelope, config: GatewayConfig, health: HealthBook, now_ms: int,
           rng: random.Random | None = None) -> Decision:
    """The deployment for this attempt, or a GatewayError (raised) that is the request's final answer.

    An untried, healthy deployment in the chain goes at once; when none is left, the request
    retries the deployment that is free soonest after a jittered backoff (and at least the
    last error's Retry-After), unless that would pass its deadline or it has had MAX_ATTEMPTS.
    """
    rng = rng or random.Random()
    groups, rule = chain(env, config)
    tokens = estimate_input_tokens(env.body)
    fmt = required_format(env)
    if fmt is not None and env.native is not None and env.native.lossy is not None \
            and not any(_fitting(g, tokens, fmt) for g in groups):
        names = ", ".join(repr(g.name) for g in groups)
        raise native_required(env.native.lossy, fmt, f"model group {names} has none" if len(groups) == 1
                              else f"none of the model groups {names} has one")
    failed = {h.deployment for h in env.history}
    now = now_ms / 1000.0
    for g in groups:
        candidates = [d for d in _fitting(g, tokens, fmt) if d.id not in failed and health.available(d.id, now)]
        if candidates:
            dep = pick(g, candidates, health, env, now, rng)
            health.note_routed(dep.id, env.id, env.attempt, now)
            return Decision(g, dep, rule=rule, announce_start=_announced(g, dep, health))

    if len(env.history) >= MAX_ATTEMPTS:
        raise final_error(env)
    last = env.history[-1] if env.history else None
    options: list[tuple[float, int, ModelGroup, Deployment]] = []
    for g in groups:
        for d in _fitting(g, tokens, fmt):
            wait = health.cooldown_left(d.id, now)
            if last is not None and last.deployment == d.id and last.retry_after_s:
                wait = max(wait, last.retry_after_s)  # the events topic may not have told us yet
            options.append((wait, len(options), g, d))
    if not options:
        raise final_error(env)
    wait, _, g, dep = min(options, key=lambda o: (o[0], o[1]))
    if env.history:
        wait = max(wait, backoff_s(len(env.history), rng))
    if now_ms + wait * 1000 >= env.deadline_ms:
        raise final_error(env, out_of_time=True)
    health.note_routed(dep.id, env.id, env.attempt, now + wait)
    return Decision(g, dep, not_before_ms=int(now_ms + wait * 1000), rule=rule,
                    announce_start=_announced(g, dep, health))


def _announced(group: ModelGroup, dep: Deployment, health: HealthBook) -> bool:
    """Whether the worker must tell every replica the call began: a least-busy group counts calls in flight, and
    a call to a tripped deployment is its probe, which other replicas must see taken. Any other `start` event
    would change no replica's decision, and costs a message produced, stored and read by every replica."""
    return group.strategy == "least-busy" or health.tripped(dep.id)


def final_error(env: RequestEnvelope, out_of_time: bool = False) -> GatewayError:
    """The answer when no attempt is left: the last provider error as the client should see it."""
    if not env.history:
        return GatewayError(503, "No deployment is available for this model right now.", code="no_deployment")
    last = env.history[-1]
    message = last.message
    if out_of_time and retryable(last):
        message = f"{message} (no deployment could take the request before its deadline)"
    route = f"group={env.model_group or env.model}; deployment={last.deployment}; attempt={len(env.history) - 1}"
    return GatewayError(last.status, message, type=last.error_type, code=last.code, param=last.param,
                        retry_after_s=last.retry_after_s, headers={topics.HEADER_ROUTE: route})
