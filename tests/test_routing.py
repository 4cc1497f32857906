"""Routing decisions and deployment health, without Kafka: `decide()` and `HealthBook` as pure logic.

Each test builds a config, feeds the HealthBook the attempt events workers would publish, and
checks which deployment the router picks (or which error it answers) for an envelope.
"""

from __future__ import annotations

import itertools
import random
import textwrap
from collections import Counter
from typing import Any

import pytest

from switchyard.shared.breaker import BreakerSettings, HealthBook
from switchyard.shared.config import parse_config
from switchyard.shared.config_schema import GatewayConfig
from switchyard.shared.contracts import AttemptEvent, AttemptRecord, RequestEnvelope, now_ms
from switchyard.shared.errors import GatewayError
from switchyard.shared.pricing import lookup
from switchyard.shared.routing import (
    BACKOFF_BASE_S,
    MAX_ATTEMPTS,
    Decision,
    decide,
    estimate_input_tokens,
)

T0 = now_ms()
_ids = itertools.count()


def cfg(text: str) -> GatewayConfig:
    return parse_config(textwrap.dedent(text), env={})


def env_for(model: str, content: str = "hi", history: list[AttemptRecord] | None = None,
            **fields: Any) -> RequestEnvelope:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **fields.pop("body", {})}
    return RequestEnvelope(id=f"req-{next(_ids)}", model=model, body=body, reply_topic="r",
                           history=history or [], attempt=len(history or []), deadline_ms=T0 + 300_000, **fields)


def failure(dep: str, status: int = 503, code: str | None = None, retry_after: float | None = None) -> AttemptRecord:
    return AttemptRecord(deployment=dep, status=status, error_type="api_error", message=f"{dep} said {status}",
                         retry_after_s=retry_after, code=code)


def event(dep: str, at_ms: int, ok: bool = True, status: int = 200, latency_ms: float = 50.0,
          retry_after: float | None = None, ttft_ms: float | None = None, phase: str = "end",
          request_id: str | None = None) -> AttemptEvent:
    return AttemptEvent(request_id=request_id or f"ev-{next(_ids)}", attempt=0, ts_ms=at_ms, deployment=dep,
                        provider="openai", model_group=dep.split("/")[0], ok=ok, status=status,
                        latency_ms=latency_ms, retry_after_s=retry_after, ttft_ms=ttft_ms,
                        phase=phase)  # type: ignore[arg-type]


def pick(config: GatewayConfig, env: RequestEnvelope, health: HealthBook | None = None, at_ms: int = T0,
         seed: int = 1) -> Decision:
    return decide(env, config, health or HealthBook(), at_ms, random.Random(seed))


TWO = cfg("""
    models:
      - name: chat
        deployments:
          - {provider: openai, model: gpt-4o-mini, api_key: a}
          - {provider: openai, model: gpt-4o-mini, api_key: b}
""")


# ---- strategies -------------------------------------------------------------------------------


def test_fallback_goes_in_order_and_skips_what_this_request_already_tried() -> None:
    assert pick(TWO, env_for("chat")).deployment.id == "chat/0"
    assert pick(TWO, env_for("chat", history=[failure("chat/0")])).deployment.id == "chat/1"


def test_group_fallbacks_then_request_fallbacks_in_order() -> None:
    config = cfg("""
        models:
          - {name: a, fallbacks: [b], deployments: [{provider: openai, model: m, api_key: k}]}
          - {name: b, deployments: [{provider: openai, model: m, api_key: k}]}
          - {name: c, deployments: [{provider: openai, model: m, api_key: k}]}
    """)
    assert pick(config, env_for("a", history=[failure("a/0")])).deployment.id == "b/0"
    env = env_for("a", history=[failure("a/0"), failure("b/0")], body={"fallbacks": ["c", "nonexistent"]})
    decision = pick(config, env)
    assert (decision.group.name, decision.deployment.id, decision.not_before_ms) == ("c", "c/0", 0)


def test_weighted_split_follows_weights_over_1000_decisions() -> None:
    config = cfg("""
        models:
          - name: w
            strategy: weighted
            deployments:
              - {provider: openai, model: m, api_key: k, weight: 6}
              - {provider: openai, model: m, api_key: k, weight: 3}
              - {provider: openai, model: m, api_key: k, weight: 1}
              - {provider: openai, model: m, api_key: k, weight: 0}
    """)
    health = HealthBook()
    rng = random.Random(42)
    counts = Counter(decide(env_for("w"), config, health, T0, rng).deployment.id for _ in range(1000))
    shares = {dep: counts[dep] / 1000 for dep in ("w/0", "w/1", "w/2", "w/3")}
    assert abs(shares["w/0"] - 0.6) <= 0.05, shares
    assert abs(shares["w/1"] - 0.3) <= 0.05, shares
    assert abs(shares["w/2"] - 0.1) <= 0.05, shares
    assert shares["w/3"] == 0.0


def test_weighted_skips_a_deployment_whose_breaker_is_open() -> None:
    config = cfg("""
        models:
          - name: w
            strategy: weighted
            deployments:
              - {provider: openai, model: m, api_key: k, weight: 9}
              - {provider: openai, model: m, api_key: k, weight: 1}
    """)
    health = HealthBook()
    health.apply(event("w/0", T0, ok=False, status=429, retry_after=30))
    picks = {decide(env_for("w"), config, health, T0 + 1000, random.Random(i)).deployment.id for i in range(50)}
    assert picks == {"w/1"}


def test_cost_picks_the_cheapest_by_the_pricing_catalogue() -> None:
    config = cfg("""
        models:
          - name: c
            strategy: cost
            deployments:
              - {provider: openai, model: gpt-4o, api_key: k}
              - {provider: anthropic, model: some-unpriced-model, api_key: k}
              - {provider: openai, model: gpt-4.1-nano, api_key: k}
              - {provider: openai, model: gpt-4o-mini, api_key: k}
    """)
    prices = {m: lookup("openai", m) for m in ("gpt-4o", "gpt-4.1-nano", "gpt-4o-mini")}
    assert all(p is not None for p in prices.values())
    cheapest = min(prices, key=lambda m: prices[m].input + prices[m].output)  # type: ignore[union-attr]
    assert cheapest == "gpt-4.1-nano"
    assert pick(config, env_for("c")).deployment.model == "gpt-4.1-nano"
    # When the cheapest has failed this request, the next cheapest (not the first listed) is next.
    assert pick(config, env_for("c", history=[failure("c/2")])).deployment.model == "gpt-4o-mini"


def test_cost_weighs_input_against_output_prices() -> None:
    # gpt-4.1-mini: 0.40 in / 1.60 out; o3-mini: 1.10 in / 4.40 out per million tokens: mini is cheaper either way,
    # while a long prompt makes gpt-4.1 (2.00 in) dearer than o3-mini (1.10 in) despite similar output prices.
    config = cfg("""
        models:
          - name: c
            strategy: cost
            deployments:
              - {provider: openai, model: gpt-4.1, api_key: k}
              - {provider: openai, model: o3-mini, api_key: k}
    """)
    long_prompt = env_for("c", content="x" * 400_000, body={"max_tokens": 1})
    assert pick(config, long_prompt).deployment.model == "o3-mini"


LATENCY = cfg("""
    models:
      - name: fast
        strategy: latency
        deployments:
          - {provider: openai, model: m, api_key: k}
          - {provider: openai, model: m, api_key: k}
""")


def test_latency_measures_unknown_deployments_then_picks_the_lowest_ewma() -> None:
    health = HealthBook()
    health.apply(event("fast/0", T0, latency_ms=100))
    # fast/1 was never measured: it gets the next request so it is.
    assert pick(LATENCY, env_for("fast"), health).deployment.id == "fast/1"
    health.apply(event("fast/1", T0, latency_ms=400))
    assert {pick(LATENCY, env_for("fast"), health, seed=s).deployment.id for s in range(20)} == {"fast/0"}


def test_latency_shifts_away_when_a_deployment_gets_slow_and_comes_back_later() -> None:
    health = HealthBook()
    for i in range(5):
        health.apply(event("fast/0", T0 + i, latency_ms=80))
        health.apply(event("fast/1", T0 + i, latency_ms=700))
    assert pick(LATENCY, env_for("fast"), health).deployment.id == "fast/0"
    # One slow answer is enough: the score is peak-sensitive (a plain EWMA would still say ~650 ms < 700 ms).
    health.apply(event("fast/0", T0 + 10, latency_ms=2000))
    decided = [pick(LATENCY, env_for("fast"), health, at_ms=T0 + 20, seed=s).deployment.id for s in range(20)]
    assert set(decided) == {"fast/1"}
    # fast/1 keeps answering in 700 ms; fast/0's old score decays while it gets no traffic, so after a
    # minute it is tried again: a deployment that recovered is noticed.
    for i in range(60):
        health.apply(event("fast/1", T0 + 1000 * i, latency_ms=700))
    assert pick(LATENCY, env_for("fast"), health, at_ms=T0 + 60_000).deployment.id == "fast/0"


def test_latency_uses_time_to_first_token_for_streams() -> None:
    health = HealthBook()
    health.apply(event("fast/0", T0, latency_ms=500, ttft_ms=300))   # quick total, slow first token
    health.apply(event("fast/1", T0, latency_ms=3000, ttft_ms=50))   # long answer, quick first token
    assert pick(LATENCY, env_for("fast"), health).deployment.id == "fast/0"
    assert pick(LATENCY, env_for("fast", stream=True), health).deployment.id == "fast/1"


def test_least_busy_counts_started_calls_and_its_own_decisions() -> None:
    config = cfg("""
        models:
          - name: lb
            strategy: least-busy
            deployments:
              - {provider: openai, model: m, api_key: k}
              - {provider: openai, model: m, api_key: k}
              - {provider: openai, model: m, api_key: k}
    """)
    health = HealthBook()
    now = now_ms()  # start events count only while recent: not the module-level T0
    for dep, n in (("lb/0", 3), ("lb/1", 1), ("lb/2", 2)):
        for i in range(n):
            health.apply(event(dep, now, phase="start", request_id=f"{dep}-{i}"))
    first = pick(config, env_for("lb"), health)
    assert first.deployment.id == "lb/1"
    # That decision is now in flight too (1 + 1 = 2): lb/1 and lb/2 tie, lb/0 (3) is never chosen.
    assert pick(config, env_for("lb"), health, seed=3).deployment.id in {"lb/1", "lb/2"}
    for i in range(3):
        health.apply(event("lb/0", now + 50, request_id=f"lb/0-{i}"))  # lb/0's calls end
    assert pick(config, env_for("lb"), health).deployment.id == "lb/0"


# ---- rules ------------------------------------------------------------------------------------

RULES = cfg("""
    models:
      - {name: default, deployments: [{provider: openai, model: m, api_key: k}]}
      - {name: vip, deployments: [{provider: openai, model: m, api_key: k}]}
      - {name: beta, deployments: [{provider: openai, model: m, api_key: k}]}
      - {name: long, deployments: [{provider: openai, model: m, api_key: k}]}
      - {name: short, deployments: [{provider: openai, model: m, api_key: k}]}
      - {name: tools, deployments: [{provider: openai, model: m, api_key: k}]}
      - {name: vision, deployments: [{provider: openai, model: m, api_key: k}]}
      - {name: code, deployments: [{provider: openai, model: m, api_key: k}]}
      - {name: other, deployments: [{provider: openai, model: m, api_key: k}]}
    routing_rules:
      - {name: by-tier, metadata: {tier: vip}, route_to: vip}
      - {name: by-header, headers: {X-Channel: beta}, route_to: beta}
      - {name: big-prompts, min_input_tokens: 1000, route_to: long}
      - {name: tool-use, has_tools: true, route_to: tools}
      - {name: images, has_images: true, route_to: vision}
      - {name: code, last_user_message_regex: "(?i)\\\\b(python|sql)\\\\b", route_to: code}
      - {name: only-other, models: [other], max_input_tokens: 5, route_to: short}
""")


@pytest.mark.parametrize(("env", "group", "rule"), [
    (env_for("default"), "default", None),
    (env_for("default", metadata={"tier": "vip"}), "vip", "by-tier"),
    (env_for("default", body={"metadata": {"tier": "vip"}}), "vip", "by-tier"),
    (env_for("default", metadata={"tier": "free"}), "default", None),
    (env_for("default", route_headers={"x-channel": "beta"}), "beta", "by-header"),
    (env_for("default", route_headers={"x-channel": "stable"}), "default", None),
    (env_for("default", content="word " * 1000), "long", "big-prompts"),
    (env_for("default", body={"tools": [{"type": "function", "function": {"name": "f"}}]}), "tools", "tool-use"),
    (env_for("default", body={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}), "vision", "images"),
    (env_for("default", content="write Python to sort a list"), "code", "code"),
    (env_for("default", content="a pythonic haiku"), "default", None),
    (env_for("other", content="hi"), "short", "only-other"),
    (env_for("default", content="hi"), "default", None),
])
def test_rules_pick_the_group(env: RequestEnvelope, group: str, rule: str | None) -> None:
    decision = pick(RULES, env)
    assert (decision.group.name, decision.rule) == (group, rule)


def test_first_matching_rule_wins() -> None:
    env = env_for("default", metadata={"tier": "vip"}, route_headers={"x-channel": "beta"},
                  content="python " * 1000)
    assert pick(RULES, env).group.name == "vip"
    env = env_for("default", route_headers={"x-channel": "beta"}, content="python " * 1000)
    assert pick(RULES, env).group.name == "beta"


# ---- context window and content policy ---------------------------------------------------------

WINDOWS = cfg("""
    models:
      - name: small
        context_window_fallback: large
        content_policy_fallback: lenient
        deployments:
          - {provider: openai, model: m, api_key: k, context_window: 1000}
          - {provider: openai, model: m, api_key: k, context_window: 2000}
      - name: large
        deployments: [{provider: openai, model: m, api_key: k, context_window: 200000}]
      - name: lenient
        deployments: [{provider: openai, model: m, api_key: k}]
      - name: strict
        deployments: [{provider: openai, model: m, api_key: k}]
""")


def test_context_window_fallback_is_decided_before_calling() -> None:
    assert pick(WINDOWS, env_for("small", content="hi")).deployment.id == "small/0"
    # ~1,500 tokens: too long for small/0 but fits small/1.
    mid = env_for("small", content="x" * 6000)
    assert 1000 < estimate_input_tokens(mid.body) <= 2000
    assert pick(WINDOWS, mid).deployment.id == "small/1"
    # ~5,000 tokens fit no deployment of `small`: straight to `large`, no wasted call.
    decision = pick(WINDOWS, env_for("small", content="x" * 20_000))
    assert (decision.group.name, decision.deployment.id) == ("large", "large/0")


def test_context_length_error_from_the_provider_goes_to_the_context_window_fallback() -> None:
    env = env_for("small", history=[failure("small/0", 400, code="context_length_exceeded")])
    assert pick(WINDOWS, env).deployment.id == "large/0"


def test_content_filter_goes_to_the_content_policy_fallback_and_only_once() -> None:
    env = env_for("small", history=[failure("small/0", 400, code="content_filter")])
    assert pick(WINDOWS, env).deployment.id == "lenient/0"
    env = env_for("small", history=[failure("small/0", 400, code="content_filter"),
                                    failure("lenient/0", 400, code="content_filter")])
    with pytest.raises(GatewayError) as err:
        pick(WINDOWS, env)
    assert (err.value.status, err.value.code) == (400, "content_filter")


def test_a_retryable_failure_in_the_fallback_group_stays_in_the_fallback_chain() -> None:
    config = cfg("""
        models:
          - name: small
            context_window_fallback: large
            deployments: [{provider: openai, model: m, api_key: k}, {provider: openai, model: m, api_key: k}]
          - name: large
            deployments: [{provider: openai, model: m, api_key: k}, {provider: openai, model: m, api_key: k}]
    """)
    env = env_for("small", history=[failure("small/0", 400, code="context_length_exceeded"), failure("large/0")])
    assert pick(config, env).deployment.id == "large/1"


def test_a_group_without_the_matching_fallback_answers_the_error() -> None:
    env = env_for("strict", history=[failure("strict/0", 400, code="content_filter")])
    with pytest.raises(GatewayError) as err:
        pick(WINDOWS, env)
    assert err.value.status == 400


# ---- failures and retries ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_non_retryable_errors_are_answered_at_once(status: int) -> None:
    env = env_for("chat", history=[failure("chat/0", status)])
    with pytest.raises(GatewayError) as err:
        pick(TWO, env)  # chat/1 is healthy and untried, and still not used
    assert err.value.status == status
    assert err.value.message == f"chat/0 said {status}"
    assert err.value.headers["x-switchyard-route"] == "group=chat; deployment=chat/0; attempt=0"


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_errors_fail_over(status: int) -> None:
    assert pick(TWO, env_for("chat", history=[failure("chat/0", status)])).deployment.id == "chat/1"


def test_when_every_deployment_failed_it_retries_with_jittered_exponential_backoff() -> None:
    waits: dict[int, list[float]] = {}
    for n in (2, 3, 4):
        history = [failure(f"chat/{i % 2}") for i in range(n)]
        waits[n] = []
        for seed in range(200):
            decision = pick(TWO, env_for("chat", history=history), seed=seed)
            waits[n].append((decision.not_before_ms - T0) / 1000)
    for n, values in waits.items():
        cap = BACKOFF_BASE_S * 2**n
        assert all(0 <= w <= cap + 0.001 for w in values), (n, max(values))
        assert max(values) > cap * 0.8   # full jitter: the whole range is used...
        assert min(values) < cap * 0.2   # ...from (almost) nothing to the cap
    assert sum(waits[4]) > sum(waits[2])  # and the range grows with each attempt


def test_retry_waits_at_least_the_retry_after_of_the_last_error() -> None:
    history = [failure("chat/0"), failure("chat/1", 429, retry_after=3.0)]
    decision = pick(TWO, env_for("chat", history=history))
    # chat/0 is free now, chat/1 asked for 3 s: chat/0 goes next after a backoff only.
    assert decision.deployment.id == "chat/0"
    assert decision.not_before_ms - T0 <= BACKOFF_BASE_S * 4 * 1000
    single = cfg("models: [{name: one, deployments: [{provider: openai, model: m, api_key: k}]}]")
    decision = pick(single, env_for("one", history=[failure("one/0", 429, retry_after=3.0)]))
    assert decision.not_before_ms - T0 >= 3000


def test_retries_are_bounded_by_the_deadline() -> None:
    history = [failure("chat/0"), failure("chat/1", 429, retry_after=5.0)]
    env = env_for("chat", history=[failure("chat/0", 429, retry_after=5.0), failure("chat/1", 429, retry_after=5.0)])
    env.deadline_ms = T0 + 2000
    health = HealthBook()
    health.apply(event("chat/0", T0, ok=False, status=429, retry_after=5.0))
    with pytest.raises(GatewayError) as err:
        decide(env, TWO, health, T0, random.Random(1))
    # The caller gets the provider's 429 and its Retry-After, not a wait past its deadline.
    assert err.value.status == 429
    assert err.value.response_headers()["retry-after"] == "5"
    assert "deadline" in err.value.message
    env = env_for("chat", history=history)
    env.deadline_ms = T0 + 10_000
    assert decide(env, TWO, HealthBook(), T0, random.Random(1)).deployment.id == "chat/0"


def test_attempts_are_capped() -> None:
    history = [failure(f"chat/{i % 2}") for i in range(MAX_ATTEMPTS)]
    with pytest.raises(GatewayError) as err:
        pick(TWO, env_for("chat", history=history))
    assert err.value.status == 503


def test_unknown_model_is_404() -> None:
    with pytest.raises(GatewayError) as err:
        pick(TWO, env_for("nope"))
    assert (err.value.status, err.value.code) == (404, "model_not_found")


def test_when_everything_is_cooling_down_a_new_request_waits_for_the_first_to_reopen() -> None:
    health = HealthBook()
    health.apply(event("chat/0", T0, ok=False, status=429, retry_after=8))
    health.apply(event("chat/1", T0, ok=False, status=429, retry_after=2))
    decision = pick(TWO, env_for("chat"), health, at_ms=T0 + 500)
    assert decision.deployment.id == "chat/1"
    assert decision.not_before_ms == T0 + 2000
    short = env_for("chat")
    short.deadline_ms = T0 + 1500
    with pytest.raises(GatewayError) as err:
        pick(TWO, short, health, at_ms=T0 + 500)
    assert err.value.status == 503


# ---- the circuit breaker ----------------------------------------------------------------------

SETTINGS = BreakerSettings(failures_to_open=3, window_s=30, min_samples=10, error_ratio=0.5, cooldown_s=10,
                           probe_timeout_s=5)


def test_breaker_opens_after_n_consecutive_failures_and_client_errors_do_not_count() -> None:
    health = HealthBook(SETTINGS)
    health.apply(event("chat/0", T0, ok=False, status=503))
    health.apply(event("chat/0", T0 + 1, ok=False, status=503))
    for i in range(5):
        health.apply(event("chat/0", T0 + 2 + i, ok=False, status=400))
    assert health.available("chat/0", T0 / 1000 + 0.1)
    assert pick(TWO, env_for("chat"), health, at_ms=T0 + 100).deployment.id == "chat/0"
    health.apply(event("chat/0", T0 + 10, ok=False, status=502))
    assert not health.available("chat/0", T0 / 1000 + 0.1)
    assert pick(TWO, env_for("chat"), health, at_ms=T0 + 100).deployment.id == "chat/1"
    assert health.available("chat/0", T0 / 1000 + 10.1)


def test_a_success_resets_the_consecutive_count() -> None:
    health = HealthBook(BreakerSettings(failures_to_open=3, min_samples=1000))  # the ratio is not the point here
    for i in range(4):
        health.apply(event("chat/0", T0 + 10 * i, ok=False))
        health.apply(event("chat/0", T0 + 10 * i + 1, ok=False))
        health.apply(event("chat/0", T0 + 10 * i + 2, ok=True))
        assert health.available("chat/0", T0 / 1000 + 1), i


def test_breaker_opens_on_the_error_ratio_over_the_window() -> None:
    health = HealthBook(SETTINGS)
    # Two failures, one success, repeated: never 3 in a row, but 2/3 of the outcomes fail.
    outcomes = [False, False, True] * 4
    for i, ok in enumerate(outcomes[:9]):
        health.apply(event("chat/0", T0 + 100 * i, ok=ok))
    assert health.available("chat/0", T0 / 1000 + 1), "fewer samples than min_samples: no verdict yet"
    health.apply(event("chat/0", T0 + 900, ok=False))
    assert not health.available("chat/0", T0 / 1000 + 1)


def test_old_outcomes_leave_the_window() -> None:
    health = HealthBook(SETTINGS)
    for i in range(8):
        health.apply(event("chat/0", T0 + 10 * i, ok=i % 3 == 2))  # F F S F F S F F
    later = T0 + 60_000
    for i in range(3):
        health.apply(event("chat/0", later + 10 * i, ok=True))
    health.apply(event("chat/0", later + 100, ok=False))
    assert health.available("chat/0", later / 1000 + 1)


def test_429_retry_after_cools_the_deployment_for_exactly_that_long() -> None:
    health = HealthBook(SETTINGS)
    health.apply(event("chat/0", T0, ok=False, status=429, retry_after=25))
    at = T0 / 1000
    assert not health.available("chat/0", at + 24.9)
    assert health.available("chat/0", at + 25.1)
    health2 = HealthBook(SETTINGS)
    health2.apply(event("chat/0", T0, ok=False, status=429, retry_after=0.5))
    assert not health2.available("chat/0", at + 0.4)
    assert health2.available("chat/0", at + 0.6)  # shorter than the default cooldown: honoured too


def test_a_429_without_retry_after_counts_like_any_failure() -> None:
    # One key of a multi-key deployment hitting its limit must not take the whole deployment out.
    health = HealthBook(SETTINGS)
    health.apply(event("chat/0", T0, ok=False, status=429))
    health.apply(event("chat/0", T0 + 1, ok=False, status=429))
    assert health.available("chat/0", T0 / 1000 + 0.1)
    health.apply(event("chat/0", T0 + 2, ok=False, status=429))
    assert not health.available("chat/0", T0 / 1000 + 0.1)


def test_a_503_with_retry_after_is_honoured_too() -> None:
    health = HealthBook(SETTINGS)
    health.apply(event("chat/0", T0, ok=False, status=503, retry_after=3))
    assert not health.available("chat/0", T0 / 1000 + 2.9)
    assert health.available("chat/0", T0 / 1000 + 3.1)


def test_half_open_lets_one_probe_through_then_closes_on_its_success() -> None:
    health = HealthBook(SETTINGS)
    for i in range(3):
        health.apply(event("chat/0", T0 + i, ok=False))
    after = T0 + 10_100  # cooldown over: half-open
    assert health.get("chat/0").state(after / 1000) == "half-open"
    probe = pick(TWO, env_for("chat"), health, at_ms=after)
    assert probe.deployment.id == "chat/0"
    # While the probe is out, everyone else goes to chat/1.
    assert [pick(TWO, env_for("chat"), health, at_ms=after + 100 * i).deployment.id for i in range(5)] == \
        ["chat/1"] * 5
    health.apply(event("chat/0", after + 300, ok=True, latency_ms=250))
    assert health.get("chat/0").state(after / 1000 + 1) == "closed"
    assert [pick(TWO, env_for("chat"), health, at_ms=after + 400 + i).deployment.id for i in range(3)] == \
        ["chat/0"] * 3


def test_a_failed_probe_opens_the_breaker_again() -> None:
    health = HealthBook(SETTINGS)
    for i in range(3):
        health.apply(event("chat/0", T0 + i, ok=False))
    after = T0 + 10_100
    assert pick(TWO, env_for("chat"), health, at_ms=after).deployment.id == "chat/0"
    health.apply(event("chat/0", after + 50, ok=False, latency_ms=40))
    assert not health.available("chat/0", (after + 9_000) / 1000)
    assert health.available("chat/0", (after + 10_100) / 1000)


def test_a_lost_probe_is_replaced_after_the_probe_timeout() -> None:
    health = HealthBook(SETTINGS)
    for i in range(3):
        health.apply(event("chat/0", T0 + i, ok=False))
    after = T0 + 10_100
    assert pick(TWO, env_for("chat"), health, at_ms=after).deployment.id == "chat/0"
    assert pick(TWO, env_for("chat"), health, at_ms=after + 4_900).deployment.id == "chat/1"
    assert pick(TWO, env_for("chat"), health, at_ms=after + 5_100).deployment.id == "chat/0"


def test_a_start_event_from_a_worker_marks_the_probe_as_taken_for_every_router() -> None:
    health = HealthBook(SETTINGS)
    for i in range(3):
        health.apply(event("chat/0", T0 + i, ok=False))
    after = T0 + 10_100
    health.apply(event("chat/0", after, phase="start", request_id="other-routers-probe"))
    assert pick(TWO, env_for("chat"), health, at_ms=after + 10).deployment.id == "chat/1"


def test_a_calls_start_is_announced_only_where_another_replica_decides_by_it() -> None:
    """A worker sends a `start` event only when routing asked for one: for a least-busy group's calls (counted
    in flight by every replica) and for a probe (taken for every replica); a call of a healthy fallback group
    announces nothing, which saves every replica a message."""
    healthy = pick(TWO, env_for("chat"))
    assert healthy.deployment.id == "chat/0" and not healthy.announce_start
    env = env_for("chat")
    assert env.announce_start  # until routing decides: what an older router's envelope does
    healthy.apply(env)
    assert not env.announce_start

    least_busy = cfg("""
        models:
          - name: lb
            strategy: least-busy
            deployments: [{provider: openai, model: m, api_key: k}]
    """)
    assert pick(least_busy, env_for("lb")).announce_start

    health = HealthBook(SETTINGS)
    for i in range(3):
        health.apply(event("chat/0", T0 + i, ok=False))
    after = T0 + 10_100  # cooled down: chat/0's next call is its half-open probe
    probe = pick(TWO, env_for("chat"), health, at_ms=after)
    assert probe.deployment.id == "chat/0" and probe.announce_start
    assert not pick(TWO, env_for("chat"), health, at_ms=after + 10).announce_start  # chat/1 is healthy


def test_an_envelope_from_before_announce_start_still_announces() -> None:
    older = RequestEnvelope.model_validate_json(
        b'{"v": 1, "id": "r", "model": "chat", "body": {}, "reply_topic": "r", "deployment": "chat/0"}')
    assert older.announce_start


def test_a_success_that_began_before_the_trip_does_not_close_the_breaker() -> None:
    health = HealthBook(SETTINGS)
    for i in range(3):
        health.apply(event("chat/0", T0 + i, ok=False))
    # A slow call that started 5 s before the trip ends well: it says nothing about now.
    health.apply(event("chat/0", T0 + 100, ok=True, latency_ms=5000))
    assert not health.available("chat/0", (T0 + 200) / 1000)


def test_health_comes_only_from_events_so_two_books_fed_the_same_events_agree() -> None:
    events = [event("chat/0", T0 + i, ok=False) for i in range(3)]
    events.append(event("chat/1", T0 + 5, ok=False, status=429, retry_after=4))
    a, b = HealthBook(SETTINGS), HealthBook(SETTINGS)
    for e in events:
        a.apply(e)
        b.apply(e)
    for at in (T0 + 100, T0 + 4_100, T0 + 9_000, T0 + 10_100):
        assert [a.available(d, at / 1000) for d in ("chat/0", "chat/1")] == \
            [b.available(d, at / 1000) for d in ("chat/0", "chat/1")]
    assert not a.available("chat/1", (T0 + 4000) / 1000)
    assert a.available("chat/1", (T0 + 4_100) / 1000)
