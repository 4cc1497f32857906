"""Choosing a deployment for an attempt: content rules, fallback chains, strategies, retries.

Pure functions of (envelope, config, health, clock) so every router replica decides alike
and the rules are testable without Kafka.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from services.router.health import HealthBook
from shared.config import Deployment, GatewayConfig, ModelGroup, RouteRule
from shared.contracts import RequestEnvelope
from shared.errors import GatewayError
from shared.pricing import lookup

MAX_ATTEMPTS = 6
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 8.0
DEFAULT_OUTPUT_TOKENS = 256


@dataclass
class Decision:
    group: ModelGroup
    deployment: Deployment
    not_before_ms: int = 0


# ---- request features -------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def estimate_input_tokens(body: dict[str, Any]) -> int:
    """About one token per four characters of every message (and tool schema): cheap and conservative."""
    chars = sum(len(_text(m.get("content"))) for m in body.get("messages") or [])
    if body.get("tools"):
        chars += len(str(body["tools"]))
    if isinstance(body.get("input"), str | list):
        chars += len(str(body["input"]))
    return chars // 4 + 1


def has_images(body: dict[str, Any]) -> bool:
    return any(isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"]
                                                          if isinstance(p, dict))
               for m in body.get("messages") or [])


def last_user_message(body: dict[str, Any]) -> str:
    for m in reversed(body.get("messages") or []):
        if m.get("role") == "user":
            return _text(m.get("content"))
    return ""


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def rule_matches(rule: RouteRule, env: RequestEnvelope) -> bool:
    body = env.body
    if rule.models and env.model not in rule.models:
        return False
    meta = {**env.metadata, **{k: str(v) for k, v in (body.get("metadata") or {}).items()}}
    if any(meta.get(k) != v for k, v in rule.metadata.items()):
        return False
    headers = env.route_headers
    if any(headers.get(k.lower()) != v for k, v in rule.headers.items()):
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
    return not (rule.last_user_message_regex and not _regex(rule.last_user_message_regex).search(
        last_user_message(body)))


def first_group(env: RequestEnvelope, config: GatewayConfig) -> str:
    """The model group for a new request: the first matching rule's target, else the requested model."""
    for rule in config.routing_rules:
        if rule_matches(rule, env):
            return rule.route_to
    return env.model


# ---- strategies -------------------------------------------------------------------------------


def _estimated_cost(dep: Deployment, body: dict[str, Any]) -> float:
    price = lookup(dep.provider, dep.model)
    if price is None:
        return float("inf")
    out = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_OUTPUT_TOKENS
    return float(price.input) * estimate_input_tokens(body) + float(price.output) * int(out)


def pick(group: ModelGroup, candidates: list[Deployment], health: HealthBook, body: dict[str, Any],
         rng: random.Random) -> Deployment:
    if group.strategy == "weighted":
        weights = [d.weight for d in candidates]
        if sum(weights) <= 0:
            return candidates[0]
        return rng.choices(candidates, weights=weights)[0]
    if group.strategy == "latency":
        def score(d: Deployment) -> float:
            h = health.deployments.get(d.id)
            if h is None:
                return 0.0  # unmeasured: try it so it gets measured
            return h.ttft_ms if (h.ttft_ms is not None and body.get("stream")) else (h.latency_ms or 0.0)
        best = min(score(d) for d in candidates)
        return rng.choice([d for d in candidates if score(d) == best])
    if group.strategy == "cost":
        return min(candidates, key=lambda d: _estimated_cost(d, body))
    if group.strategy == "least-busy":
        return min(candidates, key=lambda d: health.get(d.id).in_flight)
    return candidates[0]


# ---- the decision -----------------------------------------------------------------------------


def backoff_s(attempt: int, rng: random.Random) -> float:
    """Exponential backoff with full jitter."""
    return rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def decide(env: RequestEnvelope, config: GatewayConfig, health: HealthBook, now_ms: int,
           rng: random.Random | None = None) -> Decision:
    """The deployment for this attempt, or a GatewayError (raised) that is the request's final answer."""
    rng = rng or random.Random()
    start = env.model_group or first_group(env, config)
    group = config.group(start)
    if group is None:
        raise GatewayError(404, f"The model '{start}' does not exist.", param="model", code="model_not_found")
    if not env.history and group.context_window_fallback:
        windows = [d.context_window for d in group.deployments if d.context_window]
        if windows and estimate_input_tokens(env.body) > max(windows):
            group = config.group(group.context_window_fallback) or group

    chain = [group.name, *group.fallbacks, *[f for f in env.body.get("fallbacks") or [] if isinstance(f, str)]]
    last = env.history[-1] if env.history else None
    if last is not None and not _retryable(last.status, last.code):
        target = None
        if last.code == "context_length_exceeded":
            target = group.context_window_fallback
        elif last.code == "content_filter":
            target = group.content_policy_fallback
        tried_groups = {h.deployment.rsplit("/", 1)[0] for h in env.history}
        if not target or target in tried_groups or config.group(target) is None:
            raise _final_error(env)
        chain = [target]

    failed = {h.deployment for h in env.history}
    now = now_ms / 1000.0
    seen: set[str] = set()
    groups: list[ModelGroup] = []
    for name in chain:
        g = config.group(name)
        if g is not None and name not in seen:
            seen.add(name)
            groups.append(g)
    for g in groups:
        candidates = [d for d in g.deployments if d.id not in failed and health.available(d.id, now)]
        if candidates:
            return Decision(g, pick(g, candidates, health, env.body, rng))

    # Every deployment has failed this request or is cooling down: retry the one free soonest.
    if len(env.history) >= MAX_ATTEMPTS:
        raise _final_error(env)
    options = [(health.cooldown_left(d.id, now), i, g, d) for g in groups for i, d in enumerate(g.deployments)]
    if not options:
        raise _final_error(env)
    wait, _, g, dep = min(options, key=lambda o: (o[0], o[1]))
    wait = max(wait, backoff_s(len(env.history), rng) if env.history else 0.0)
    if now_ms + wait * 1000 >= env.deadline_ms:
        raise _final_error(env, waited_for=wait)
    return Decision(g, dep, not_before_ms=int(now_ms + wait * 1000))


def _retryable(status: int, code: str | None) -> bool:
    return status in (408, 429, 500, 502, 503, 504)


def _final_error(env: RequestEnvelope, waited_for: float | None = None) -> GatewayError:
    if not env.history:
        return GatewayError(503, "No deployment is available for this model right now.", code="no_deployment")
    last = env.history[-1]
    if last.status in (408, 429, 500, 502, 503, 504) and waited_for is not None:
        message = f"{last.message} (no deployment could take the request before its deadline)"
    else:
        message = last.message
    return GatewayError(last.status, message, type=last.error_type, code=last.code,
                        retry_after_s=last.retry_after_s)
