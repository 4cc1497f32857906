"""Promises that must hold when callers misbehave (issue 18), against a real stack of its own.

The stack has routing rules and small caps (SWITCHYARD_MAX_TIMEOUT, SWITCHYARD_MAX_IN_FLIGHT) so each
abuse shows in a few seconds: a body's metadata reaching a model group the key may not use, a bad
timeout header or a vanished stream client keeping a key's parallel slot, a deadline without bound.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from switchyard.services.ingress.keys import KEY_PREFIX, KeyStore, key_hash_secret
from switchyard.shared import topics
from switchyard.shared.errors import GatewayError
from switchyard.shared.pg import Database
from switchyard.shared.settings import Settings
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import free_port
from tests.stack import MASTER_KEY, RunningStack, start_stack, warm_up

MAX_TIMEOUT_S = 4
MAX_IN_FLIGHT = 4
AUTH_FAILURE_LIMIT = 10
NAMES = ["cheap", "vip", "basic", "premium", "slow"]


def _config(fakes: dict[str, FakeOpenAI]) -> str:
    def group(name: str, extra: str = "") -> str:
        return (f"  - name: {name}\n{extra}    deployments:\n      - {{provider: openai, model: gpt-4o-mini, "
                f"api_base: '{fakes[name].url}/v1', api_key: sk-{name}}}\n")

    return ("models:\n" + group("cheap") + group("vip") + group("basic", "    fallbacks: [premium]\n")
            + group("premium") + group("slow")
            + "routing_rules:\n  - {name: vip-tier, metadata: {tier: vip}, route_to: vip}\n")


@pytest.fixture(scope="module")
def abuse_fakes() -> Iterator[dict[str, FakeOpenAI]]:
    fakes = {name: FakeOpenAI().start() for name in NAMES}
    yield fakes
    for fake in fakes.values():
        fake.stop()


@pytest.fixture(scope="module")
def abuse_stack(abuse_fakes: dict[str, FakeOpenAI], tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[RunningStack]:
    cwd: Path = tmp_path_factory.mktemp("abuse-stack")
    caps = {"SWITCHYARD_MAX_TIMEOUT": MAX_TIMEOUT_S, "SWITCHYARD_MAX_IN_FLIGHT": MAX_IN_FLIGHT,
            "SWITCHYARD_AUTH_FAILURE_LIMIT": AUTH_FAILURE_LIMIT, "SWITCHYARD_BODY_TIMEOUT": 2}
    running = start_stack(cwd, _config(abuse_fakes), extra_env={k: str(v) for k, v in caps.items()})
    try:
        warm_up(running, "cheap")
        yield running
    finally:
        code = running.stop()
        assert code == 0, f"switchyard up did not stop cleanly ({code}):\n{running.log()[-3000:]}"


@pytest.fixture(autouse=True)
def _fresh(abuse_fakes: dict[str, FakeOpenAI]) -> None:
    for fake in abuse_fakes.values():
        fake.reset()


def new_key(stack: RunningStack, **spec: Any) -> str:
    r = httpx.post(f"{stack.url}/v1/keys", json=spec, headers=stack.headers(), timeout=30)
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def chat(stack: RunningStack, key: str, model: str, headers: dict[str, str] | None = None,
         timeout: float = 60, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=timeout,
                      headers={"authorization": f"Bearer {key}", **(headers or {})})


def until(check: Callable[[], bool], limit_s: float = 20.0) -> bool:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


# ---- authorization ---------------------------------------------------------------------------


def test_body_metadata_cannot_route_a_key_to_a_group_it_may_not_use(
        abuse_stack: RunningStack, abuse_fakes: dict[str, FakeOpenAI]) -> None:
    key = new_key(abuse_stack, models=["cheap"], metadata={"tier": "basic"})
    r = chat(abuse_stack, key, "cheap", metadata={"tier": "vip"})
    assert r.status_code == 200, r.text
    assert "group=cheap" in r.headers[topics.HEADER_ROUTE]
    assert len(abuse_fakes["cheap"].calls("/chat/completions")) == 1
    assert abuse_fakes["vip"].calls() == [], "the vip deployment was called with a key limited to cheap"


def test_the_keys_own_metadata_wins_over_the_bodys(abuse_stack: RunningStack,
                                                   abuse_fakes: dict[str, FakeOpenAI]) -> None:
    basic = new_key(abuse_stack, models=["cheap", "vip"], metadata={"tier": "basic"})
    r = chat(abuse_stack, basic, "cheap", metadata={"tier": "vip"})
    assert r.status_code == 200, r.text
    assert "group=cheap" in r.headers[topics.HEADER_ROUTE]
    assert abuse_fakes["vip"].calls() == []
    # The rule itself works: a key that may use vip and says nothing of its tier is routed by the body.
    untiered = new_key(abuse_stack, models=["cheap", "vip"])
    r = chat(abuse_stack, untiered, "cheap", metadata={"tier": "vip"})
    assert r.status_code == 200, r.text
    assert "group=vip" in r.headers[topics.HEADER_ROUTE]


def test_configured_fallbacks_stay_within_the_keys_models(abuse_stack: RunningStack,
                                                          abuse_fakes: dict[str, FakeOpenAI]) -> None:
    abuse_fakes["basic"].inject(status=503, times=100)
    limited = new_key(abuse_stack, models=["basic"])
    r = chat(abuse_stack, limited, "basic", headers={topics.HEADER_TIMEOUT: "2"})
    assert r.status_code in (503, 504), r.text
    assert abuse_fakes["premium"].calls() == [], "a configured fallback took the key to a group it may not use"
    # A key that may use both still fails over.
    both = new_key(abuse_stack, models=["basic", "premium"])
    r = chat(abuse_stack, both, "basic")
    assert r.status_code == 200, r.text
    assert len(abuse_fakes["premium"].calls("/chat/completions")) == 1


# ---- admission -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["soon", "nan", "inf", "-inf", "1e309", "-1", "0"])
def test_a_bad_timeout_header_is_a_400_and_takes_no_parallel_slot(abuse_stack: RunningStack, value: str) -> None:
    key = new_key(abuse_stack, models=["cheap"], max_parallel=1)
    for _ in range(3):
        r = chat(abuse_stack, key, "cheap", headers={topics.HEADER_TIMEOUT: value})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == topics.HEADER_TIMEOUT
    r = chat(abuse_stack, key, "cheap")
    assert r.status_code == 200, f"the key's only parallel slot leaked: {r.text}"


def test_no_deadline_outlives_the_maximum_timeout(abuse_stack: RunningStack,
                                                 abuse_fakes: dict[str, FakeOpenAI]) -> None:
    abuse_fakes["slow"].inject(latency_ms=(MAX_TIMEOUT_S + 20) * 1000)
    r = chat(abuse_stack, MASTER_KEY, "slow", headers={topics.HEADER_TIMEOUT: "86400"})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "timeout"


def test_a_stream_client_that_leaves_before_its_first_byte_gives_its_slot_back(
        abuse_stack: RunningStack, abuse_fakes: dict[str, FakeOpenAI]) -> None:
    key = new_key(abuse_stack, models=["slow"], max_parallel=1)
    abuse_fakes["slow"].inject(latency_ms=1500)
    with pytest.raises(httpx.ReadTimeout):
        chat(abuse_stack, key, "slow", timeout=0.5, stream=True)
    assert until(lambda: len(abuse_fakes["slow"].calls("/chat/completions")) == 1)
    # Once the provider's answer reached ingress, the stream has nobody to go to: the slot must come back.
    assert until(lambda: chat(abuse_stack, key, "slow").status_code == 200), "the stream's parallel slot leaked"


def test_past_the_in_flight_cap_a_request_gets_503_with_retry_after(
        abuse_stack: RunningStack, abuse_fakes: dict[str, FakeOpenAI]) -> None:
    master = MASTER_KEY
    abuse_fakes["slow"].inject(latency_ms=3000, times=MAX_IN_FLIGHT)
    answers: list[httpx.Response] = []
    callers = [threading.Thread(target=lambda: answers.append(chat(abuse_stack, master, "slow")))
               for _ in range(MAX_IN_FLIGHT)]
    for t in callers:
        t.start()
    assert until(lambda: len(abuse_fakes["slow"].calls("/chat/completions")) == MAX_IN_FLIGHT)
    r = chat(abuse_stack, master, "slow")
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "overloaded"
    assert int(r.headers["retry-after"]) >= 1
    for t in callers:
        t.join()
    assert [a.status_code for a in answers] == [200] * MAX_IN_FLIGHT
    assert chat(abuse_stack, master, "slow").status_code == 200, "the cap did not give its slots back"


# ---- authentication --------------------------------------------------------------------------


async def test_random_tokens_cost_postgresql_nothing_once_keys_are_loaded(abuse_stack: RunningStack) -> None:
    key = new_key(abuse_stack, models=["cheap"])
    store = KeyStore(Database(abuse_stack.database_url), key_hash_secret(Settings(master_key=MASTER_KEY)))
    await store.load_all()
    await store.database.close()
    # From here on any query fails: nothing listens there. A token refused without one is a 401, not a 503.
    store.database = store.request_database = Database(f"postgresql://nobody@127.0.0.1:{free_port()}/none",
                                                       connect_timeout_s=2.0)
    try:
        for _ in range(200):
            with pytest.raises(GatewayError) as refused:
                await store.authenticate(KEY_PREFIX + secrets.token_urlsafe(32))
            assert refused.value.status == 401 and refused.value.code == "invalid_api_key"
        assert store.outage.down is False, "a random token made the key store query PostgreSQL"
        assert (await store.authenticate(key)).allowed_models == ["cheap"]
    finally:
        await store.database.close()


def auth_failures_counted(stack: RunningStack) -> float:
    """`switchyard_auth_failures_total{code="invalid_api_key"}` as ingress's /metrics shows it (0 before any)."""
    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('switchyard_auth_failures_total{code="invalid_api_key"}'))


def test_failed_authentications_are_throttled_per_address_and_logged_without_the_token(
        abuse_stack: RunningStack) -> None:
    guesser, neighbour = {"x-forwarded-for": "203.0.113.7"}, {"x-forwarded-for": "203.0.113.8"}
    guesses = [KEY_PREFIX + secrets.token_urlsafe(32) for _ in range(AUTH_FAILURE_LIMIT + 1)]
    counted_before = auth_failures_counted(abuse_stack)
    for token in guesses[:AUTH_FAILURE_LIMIT]:
        r = chat(abuse_stack, token, "cheap", headers=guesser)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    r = chat(abuse_stack, guesses[-1], "cheap", headers=guesser)
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_auth_failures", r.text
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert chat(abuse_stack, MASTER_KEY, "cheap", headers=guesser).status_code == 429  # the address, not the key
    assert chat(abuse_stack, MASTER_KEY, "cheap", headers=neighbour).status_code == 200
    assert auth_failures_counted(abuse_stack) - counted_before == AUTH_FAILURE_LIMIT  # the 429s are not failures
    ingress_log = abuse_stack.cwd / ".switchyard" / "logs" / "ingress-0.log"
    assert until(lambda: "throttling an address" in ingress_log.read_text())
    log = ingress_log.read_text()
    assert "203.0.113.7" in log and "authentication failed" in log
    assert not any(token[len(KEY_PREFIX):][:12] in log for token in guesses), "a guessed token reached the log"


# ---- input that must be a 400, and the HTTP surface ------------------------------------------


@pytest.mark.parametrize("field,value", [("temperature", "1.5"), ("max_tokens", "10"), ("n", "2"),
                                         ("stream", "yes"), ("top_p", "0.5")])
def test_numbers_and_booleans_sent_as_strings_are_400s_never_forwarded(
        abuse_stack: RunningStack, abuse_fakes: dict[str, FakeOpenAI], field: str, value: str) -> None:
    sent: dict[str, Any] = {field: value}
    r = chat(abuse_stack, MASTER_KEY, "cheap", **sent)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert abuse_fakes["cheap"].calls() == []


@pytest.mark.parametrize("path,method,body,param", [
    ("/v1/keys", "POST", {"expires_in": "99999999999d"}, "expires_in"),
    ("/v1/keys", "POST", {"rpm": 1099511627776}, "rpm"),
    ("/v1/keys", "POST", {"budget_usd": 1e30}, "budget_usd"),
    ("/v1/keys", "POST", {"alert_thresholds": [5, -1]}, "alert_thresholds[0]"),
    ("/v1/budgets/team/t1", "PUT", {"budget_usd": 1e30}, "budget_usd"),
    ("/v1/spend?since=99999999999d", "GET", None, "since"),
])
def test_out_of_range_admin_input_is_a_400_naming_the_field(abuse_stack: RunningStack, path: str, method: str,
                                                             body: Any, param: str) -> None:
    r = httpx.request(method, f"{abuse_stack.url}{path}", json=body, headers=abuse_stack.headers(), timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_api_answers_are_hardened(abuse_stack: RunningStack) -> None:
    r = chat(abuse_stack, MASTER_KEY, "cheap")
    assert r.status_code == 200
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
    assert "server" not in r.headers
    huge = "m" * (1 << 20)
    r = chat(abuse_stack, MASTER_KEY, huge)
    assert r.status_code == 404 and len(r.text) < 2000, "the model name was echoed in full"
    r = chat(abuse_stack, MASTER_KEY, "cheap", headers={"x-big": "v" * (1 << 20)})
    assert r.status_code == 431, r.text
    r = chat(abuse_stack, MASTER_KEY, "cheap", headers={f"x-h{i}": "1" for i in range(2000)})
    assert r.status_code == 431, r.text
    assert chat(abuse_stack, MASTER_KEY, "cheap").status_code == 200


def test_a_body_shorter_than_its_content_length_is_a_408(abuse_stack: RunningStack) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", abuse_stack.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"authorization: Bearer " + MASTER_KEY.encode() + b"\r\ncontent-length: 1000\r\n\r\n{\"model\"")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
