"""Ingress's first-attempt routing (services/ingress/first_attempt.py), without Kafka: the decision it writes
into the envelope, the health it decides with, and how a refusal or a fault in routing is answered.

That the routed request is answered, and that ingress and the routers keep out of the same cooling-down
deployment, is tested against the live stack in tests/test_routing_e2e.py and tests/test_tracing.py.
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from switchyard.services.ingress.first_attempt import FirstAttempt
from switchyard.shared import routing, topics
from switchyard.shared.config import parse_config
from switchyard.shared.contracts import AttemptEvent, RequestEnvelope, now_ms
from switchyard.shared.errors import GatewayError

CONFIG = parse_config(textwrap.dedent("""
    models:
      - name: chat
        deployments:
          - {provider: openai, model: m, api_key: k}
          - {provider: anthropic, model: claude, api_key: k}
"""), env={})


def envelope(deadline_s: float = 300.0) -> RequestEnvelope:
    return RequestEnvelope(id=f"req-{now_ms()}", model="chat", reply_topic=topics.REPLIES,
                           body={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
                           deadline_ms=now_ms() + int(deadline_s * 1000))


def cooling(deployment: str, provider: str, retry_after_s: float = 60.0) -> AttemptEvent:
    return AttemptEvent(request_id="earlier", attempt=0, deployment=deployment, provider=provider,
                        model_group="chat", ok=False, status=429, retry_after_s=retry_after_s)


def test_the_decision_goes_into_the_envelope_and_names_the_providers_topic() -> None:
    edge = FirstAttempt("127.0.0.1:9", CONFIG)
    env = envelope()
    topic, hop = edge.route(env, None)
    assert (env.model_group, env.deployment, env.not_before_ms) == ("chat", "chat/0", 0)
    assert topic == topics.provider_topic("openai") == "llm.provider.openai"
    assert hop.span is None  # tracing is off here
    # Counted in flight in this replica's book, as a router counts its own decisions (least-busy).
    assert edge.book.in_flight("chat/0", now_ms() / 1000.0) == 1


def test_a_deployment_cooling_down_in_the_followed_health_is_avoided() -> None:
    edge = FirstAttempt("127.0.0.1:9", CONFIG)
    edge.book.apply(cooling("chat/0", "openai"))  # what the feed applies from llm.events
    env = envelope()
    topic, _ = edge.route(env, None)
    assert (env.deployment, topic) == ("chat/1", "llm.provider.anthropic")


def test_no_deployment_before_the_deadline_is_the_answer_raised_before_anything_is_written() -> None:
    edge = FirstAttempt("127.0.0.1:9", CONFIG)
    edge.book.apply(cooling("chat/0", "openai"))
    edge.book.apply(cooling("chat/1", "anthropic"))
    env = envelope(deadline_s=2.0)
    with pytest.raises(GatewayError) as raised:
        edge.route(env, None)
    assert (raised.value.status, raised.value.code) == (503, "no_deployment")
    assert env.deployment is None


def test_a_fault_inside_routing_is_a_500_routing_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(routing, "decide", broken)
    with pytest.raises(GatewayError) as raised:
        FirstAttempt("127.0.0.1:9", CONFIG).route(envelope(), None)
    assert (raised.value.status, raised.value.code) == (500, "routing_error")
    assert "a bug" not in raised.value.message


def test_health_is_not_followed_before_start() -> None:
    """The dashboard shows breaker states as unknown until the feed has caught up."""
    assert FirstAttempt("127.0.0.1:9", CONFIG).following is False
