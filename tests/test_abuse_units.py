"""Issue 18's promises that are pure logic: routing within a key's models, deadline parsing, bounded buffers.

The live versions (a real stack, real HTTP) are in tests/test_abuse.py; these pin each rule down on
every edge without Kafka.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import orjson
import pytest

from switchyard.devstack.children import write_stack
from switchyard.services.ingress.admission import InFlightCap, timeout_s
from switchyard.services.ingress.replies import REPLY_OVERHEAD, Pending, StreamBuffers
from switchyard.shared import topics
from switchyard.shared.breaker import BreakerSettings, HealthBook
from switchyard.shared.contracts import AttemptRecord, Reply, RequestEnvelope
from switchyard.shared.errors import GatewayError
from switchyard.shared.routing import decide
from tests.test_routing import T0, cfg, env_for

CONFIG = """
models:
  - name: cheap
    fallbacks: [vip]
    context_window_fallback: big
    content_policy_fallback: lenient
    deployments: [{provider: openai, model: gpt-4o-mini, api_key: k, context_window: 50}]
  - name: vip
    deployments: [{provider: openai, model: gpt-4o, api_key: k}]
  - name: big
    deployments: [{provider: openai, model: gpt-4.1, api_key: k}]
  - name: lenient
    deployments: [{provider: openai, model: gpt-4.1, api_key: k}]
routing_rules:
  - {name: vip-tier, metadata: {tier: vip}, route_to: vip}
  - {name: long, min_input_tokens: 1000, route_to: big}
"""


def _decide(env: RequestEnvelope) -> str:
    return decide(env, cfg(CONFIG), HealthBook(BreakerSettings()), T0).group.name


def test_a_rule_never_takes_a_key_to_a_group_outside_its_models() -> None:
    assert _decide(env_for("cheap", body={"metadata": {"tier": "vip"}})) == "vip"
    assert _decide(env_for("cheap", body={"metadata": {"tier": "vip"}}, allowed_models=["cheap"])) == "cheap"
    long = "word " * 2000
    assert _decide(env_for("cheap", long)) == "big"
    assert _decide(env_for("cheap", long, allowed_models=["cheap"])) == "cheap"


def test_the_keys_metadata_wins_over_the_bodys() -> None:
    assert _decide(env_for("cheap", body={"metadata": {"tier": "vip"}}, metadata={"tier": "basic"})) == "cheap"
    assert _decide(env_for("cheap", body={"metadata": {"tier": "basic"}}, metadata={"tier": "vip"})) == "vip"


def test_no_fallback_of_any_kind_leaves_the_keys_models() -> None:
    failed = [AttemptRecord(deployment="cheap/0", status=503, error_type="api_error", message="down")]
    assert _decide(env_for("cheap", history=failed)) == "vip"
    retried = env_for("cheap", history=failed, allowed_models=["cheap"])
    assert _decide(retried) == "cheap"  # the same group again, after a backoff
    requested = env_for("cheap", history=failed, allowed_models=["cheap"], body={"fallbacks": ["vip"]})
    assert _decide(requested) == "cheap"
    filtered = [AttemptRecord(deployment="cheap/0", status=400, error_type="invalid_request_error",
                              message="policy", code="content_filter")]
    assert _decide(env_for("cheap", history=filtered)) == "lenient"
    with pytest.raises(GatewayError) as refused:
        _decide(env_for("cheap", history=filtered, allowed_models=["cheap"]))
    assert refused.value.code == "content_filter"


def test_an_envelope_for_a_model_its_key_may_not_use_is_refused() -> None:
    with pytest.raises(GatewayError) as refused:
        _decide(env_for("vip", allowed_models=["cheap"]))
    assert refused.value.status == 403 and refused.value.code == "model_not_allowed"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e309", "NaN", "-0", "0", "-5", "soon", "1s"])
def test_a_timeout_that_is_not_a_finite_positive_number_is_a_400(value: str) -> None:
    with pytest.raises(GatewayError) as bad:
        timeout_s(value, 300, 900)
    assert bad.value.status == 400 and bad.value.param == topics.HEADER_TIMEOUT


def test_every_timeout_is_capped() -> None:
    assert timeout_s("86400", 300, 900) == 900
    assert timeout_s(None, 3000, 900) == 900
    assert timeout_s(" 2.5 ", 300, 900) == 2.5
    assert math.isfinite(timeout_s("1e308", 300, 900))


def test_the_in_flight_cap_refuses_with_retry_after_and_gives_slots_back() -> None:
    cap = InFlightCap(2)
    cap.enter()
    cap.enter()
    with pytest.raises(GatewayError) as full:
        cap.enter()
    assert full.value.status == 503 and full.value.code == "overloaded"
    assert "retry-after" in full.value.response_headers()
    cap.leave()
    cap.enter()


def test_a_slow_readers_stream_buffer_is_bounded() -> None:
    """Each chunk costs its wire bytes plus REPLY_OVERHEAD: a 8-chunk allowance takes 8, the 9th ends it."""
    pending = Pending(limit=8 * (1000 + REPLY_OVERHEAD))
    for seq in range(100):
        pending.offer(Reply(id="r", seq=seq, type="chunk", data={"text": "x" * 1000}), wire_bytes=1000)
    assert pending.queue.qsize() == 9 and pending.finished
    replies = [pending.queue.get_nowait() for _ in range(9)]
    assert [r.type for r in replies] == ["chunk"] * 8 + ["error"]
    assert replies[-1].status == 503 and (replies[-1].data or {})["error"]["code"] == "stream_buffer_full"
    assert "retry-after" in replies[-1].headers
    assert pending.queue.bytes == 0 and pending.buffers.used == 0


def test_slow_readers_together_stay_within_the_process_total_and_a_reader_that_keeps_up_is_not_cut() -> None:
    """Three streams share a total of 30 chunks' worth: the two that never read are cut once the total is spent
    and each holds more than a third of it; the one that reads as it goes runs to its end."""
    unit = 100 + REPLY_OVERHEAD
    buffers = StreamBuffers(total=30 * unit)
    buffers.readers = 3
    stalled = [Pending(limit=1000 * unit, buffers=buffers) for _ in range(2)]
    reader = Pending(limit=1000 * unit, buffers=buffers)
    for seq in range(200):
        for pending in (*stalled, reader):
            pending.offer(Reply(id="r", seq=seq, type="chunk", data={"text": "x" * 100}), wire_bytes=100)
        while not reader.queue.empty():
            reader.queue.get_nowait()
        assert buffers.used <= 30 * unit + unit
    assert all(p.finished for p in stalled) and not reader.finished
    for pending in stalled:
        assert pending.queue.bytes <= 15 * unit
        pending.release()
    assert buffers.used == 0
def test_the_stack_file_is_never_readable_by_others(tmp_path: Path) -> None:
    """It holds the master key: created 0600 before the key is written (even under a permissive umask)."""
    path = tmp_path / ".switchyard" / "stack.json"
    old = os.umask(0)
    try:
        write_stack(path, {"master_key": "sk-secret"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert orjson.loads(path.read_bytes()) == {"master_key": "sk-secret"}


def test_attempts_that_never_end_are_forgotten_under_every_strategy() -> None:
    """Calls routed (or started) whose outcome never comes do not grow the health book, even when nothing
    asks for the in-flight count (only least-busy routing did, before)."""
    book = HealthBook(BreakerSettings(in_flight_ttl_s=60))
    for i in range(1000):
        book.note_routed("d1", f"r{i}", 0, now=100.0)
    book.note_routed("d1", "late", 0, now=100.0 + 61)
    assert len(book.get("d1").started) == 1
