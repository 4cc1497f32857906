"""The response cache against a real stack: its own `switchyard up` (Apache Kafka, PostgreSQL, every service), a
second ingress replica on the same broker and database, a fake chat provider and a fake embedding provider
whose vectors the tests choose. A hit is proven by the provider not being called again."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import asyncpg
import httpx
import openai
import orjson
import pytest

from switchyard.shared import topics
from tests.fakes.embedding_fake import FakeEmbeddings, near, random_vector
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import free_port
from tests.stack import MASTER_KEY, RunningStack, _child_env, start_stack, warm_up

THRESHOLD = 0.95
SYSTEM = {"role": "system", "content": "Answer in one sentence."}


class Providers:
    def __init__(self) -> None:
        self.chat = FakeOpenAI().start()
        self.embed = FakeEmbeddings().start()

    def stop(self) -> None:
        self.chat.stop()
        self.embed.stop()


def _config(p: Providers) -> str:
    chat = f"{{provider: openai, model: gpt-4o-mini, api_base: '{p.chat.url}/v1', api_key: sk-chat}}"
    return f"""
cache:
  ttl_s: 3600
  semantic:
    embedding_model: embed
    threshold: {THRESHOLD}
models:
  - name: cached
    cache: true
    deployments: [{chat}]
  - name: short-lived
    cache: true
    cache_ttl_s: 3
    deployments: [{chat}]
  - name: plain
    deployments: [{chat}]
  - name: embed
    deployments:
      - {{provider: openai, model: text-embedding-3-small, api_base: '{p.embed.url}/v1', api_key: sk-embed}}
"""


@pytest.fixture(scope="module")
def providers() -> Iterator[Providers]:
    p = Providers()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def cstack(providers: Providers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(tmp_path_factory.mktemp("cache-stack"), _config(providers),
                          extra_env={topics.PARTITIONS_ENV: "3"})  # reply partitions for two more ingress replicas
    try:
        warm_up(running, "plain")
        yield running
    finally:
        code = running.stop()
        assert code == 0, f"switchyard up did not stop cleanly ({code}):\n{running.log()[-3000:]}"


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _spawn_ingress(stack: RunningStack, database_url: str, partition: int, log: Path) -> Replica:
    """Another `switchyard ingress` replica on the stack's broker, owning its own reply partition."""
    port = free_port()
    env = _child_env({"KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap, "DATABASE_URL": database_url,
                      "SWITCHYARD_CONFIG": str(stack.cwd / "switchyard.yaml")})
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "switchyard.cli", "ingress", "--port", str(port),
                                 "--reply-partition", str(partition)], env=env, stdout=out, stderr=subprocess.STDOUT)
    replica = Replica(proc, f"http://127.0.0.1:{port}")
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{replica.url}/health", timeout=1).status_code == 200:
                return replica
        except httpx.HTTPError:
            pass
        assert time.time() < deadline and proc.poll() is None, f"ingress did not start:\n{log.read_text()}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def replica(cstack: RunningStack) -> Iterator[str]:
    second = _spawn_ingress(cstack, cstack.database_url, 1, cstack.cwd / "replica.log")
    yield second.url
    second.stop()


@pytest.fixture(autouse=True)
def _clean(providers: Providers) -> None:
    providers.chat.reset()
    providers.embed.reset()
    providers.embed.vectors.clear()


def sql(stack: RunningStack, query: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(stack.database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def wait_for(what: str, check: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_stored(stack: RunningStack, answer_id: str, model: str = "cached") -> None:
    """Until the answer with this id is in the cache (its INSERT committed)."""
    wait_for(f"cache entry {answer_id}", lambda: sql(
        stack, "SELECT 1 FROM response_cache WHERE model_group = $1 AND entry->'response'->>'id' = $2",
        model, answer_id))


def body(text: str, model: str = "cached", **params: Any) -> dict[str, Any]:
    return {"model": model, "messages": [SYSTEM, {"role": "user", "content": text}], **params}


def post(url: str, payload: dict[str, Any], key: str = MASTER_KEY, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=60,
                      headers={"authorization": f"Bearer {key}", **headers})


def provider_calls(p: Providers) -> int:
    return len(p.chat.calls("/chat/completions"))


def unique(text: str) -> str:
    return f"{text} [{uuid.uuid4().hex[:8]}]"


def test_exact_hit_on_a_second_replica_without_a_provider_call(cstack: RunningStack, replica: str,
                                                               providers: Providers) -> None:
    payload = body(unique("What is the boiling point of water?"), temperature=0)
    hits_before = cache_metric(replica, "hit")
    first = post(cstack.url, payload)
    assert first.status_code == 200, first.text
    assert first.headers["x-switchyard-cache"] == "miss"
    wait_stored(cstack, first.json()["id"])
    second = post(replica, payload)
    assert second.status_code == 200, second.text
    assert second.headers["x-switchyard-cache"] == "hit"
    assert second.json() == first.json()
    assert "x-switchyard-cache-similarity" not in second.headers
    assert provider_calls(providers) == 1
    assert cache_metric(replica, "hit") == hits_before + 1  # switchyard_cache_requests_total on that replica


def cache_metric(url: str, result: str) -> float:
    """switchyard_cache_requests_total{result=...} on one ingress replica's /metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(f'switchyard_cache_requests_total{{result="{result}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_change_of_any_parameter_misses(cstack: RunningStack, providers: Providers) -> None:
    text = unique("Name a prime number.")
    base = body(text, temperature=0.2, max_tokens=50)
    first = post(cstack.url, base)
    assert first.headers["x-switchyard-cache"] == "miss"
    wait_stored(cstack, first.json()["id"])
    assert post(cstack.url, base).headers["x-switchyard-cache"] == "hit"
    variants = [
        {**base, "temperature": 0.3},
        {**base, "max_tokens": 51},
        {**base, "seed": 7},
        {**base, "stop": ["."]},
        {**base, "messages": [{"role": "system", "content": "Answer in two sentences."}, base["messages"][1]]},
        {**base, "messages": [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                              base["messages"][1]]},
        {**base, "messages": [SYSTEM, {"role": "user", "content": text + " "}]},
        {**base, "model": "short-lived"},
    ]
    for variant in variants:
        r = post(cstack.url, variant)
        assert r.status_code == 200, r.text
        assert r.headers["x-switchyard-cache"] == "miss", variant
    assert provider_calls(providers) == 1 + len(variants)
    plain = post(cstack.url, {**base, "model": "plain"})  # a group that did not opt in: no header at all
    assert plain.status_code == 200 and "x-switchyard-cache" not in plain.headers


def _key(stack: RunningStack, **spec: Any) -> str:
    r = httpx.post(f"{stack.url}/v1/keys", json=spec, headers=stack.headers(), timeout=30)
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def test_entries_never_cross_tenants(cstack: RunningStack, replica: str, providers: Providers) -> None:
    team_a1, team_a2 = _key(cstack, team="alpha"), _key(cstack, team="alpha")
    team_b = _key(cstack, team="beta")
    solo, other_solo = _key(cstack), _key(cstack)
    payload = body(unique("Summarise our roadmap."))
    first = post(cstack.url, payload, key=team_a1)
    assert first.status_code == 200, first.text
    wait_stored(cstack, first.json()["id"])
    assert post(replica, payload, key=team_a2).headers["x-switchyard-cache"] == "hit"  # same team
    for key in (team_b, solo, MASTER_KEY):
        r = post(cstack.url, payload, key=key)
        assert r.status_code == 200 and r.headers["x-switchyard-cache"] == "miss", key[:8]
    wait_for("the solo key's entry", lambda: sql(
        cstack, "SELECT 1 FROM response_cache WHERE scope LIKE 'key:%' AND entry->'response'->>'id' = $1",
        first.json()["id"]))
    assert post(cstack.url, payload, key=other_solo).headers["x-switchyard-cache"] == "miss"  # no team: key only
    assert post(cstack.url, payload, key=solo).headers["x-switchyard-cache"] == "hit"


def test_entries_expire_after_their_ttl(cstack: RunningStack, providers: Providers) -> None:
    payload = body(unique("What time is it?"), model="short-lived")
    first = post(cstack.url, payload)
    answer_id = first.json()["id"]
    wait_stored(cstack, answer_id, "short-lived")
    assert post(cstack.url, payload).headers["x-switchyard-cache"] == "hit"
    wait_for("the entry to expire (on PostgreSQL's clock)", lambda: sql(
        cstack, "SELECT 1 FROM response_cache WHERE entry->'response'->>'id' = $1 AND expires_at <= now()",
        answer_id), timeout_s=10)
    again = post(cstack.url, payload)
    assert again.headers["x-switchyard-cache"] == "miss"
    assert provider_calls(providers) == 2


def test_cache_control_no_cache_no_store_and_max_age(cstack: RunningStack, providers: Providers) -> None:
    # no-cache: no lookup, but the answer is stored.
    fresh = body(unique("Define entropy."))
    r = post(cstack.url, fresh, **{"cache-control": "no-cache"})
    assert r.status_code == 200 and r.headers["x-switchyard-cache"] == "bypass"
    wait_stored(cstack, r.json()["id"])
    assert post(cstack.url, fresh).headers["x-switchyard-cache"] == "hit"
    again = post(cstack.url, fresh, **{"cache-control": "no-cache"})
    assert again.headers["x-switchyard-cache"] == "bypass"
    assert provider_calls(providers) == 2
    # no-store: neither looked up nor stored.
    private = body(unique("My account number is 42; what is it?"))
    r = post(cstack.url, private, **{"cache-control": "no-store"})
    assert r.status_code == 200 and r.headers["x-switchyard-cache"] == "bypass"
    assert post(cstack.url, private).headers["x-switchyard-cache"] == "miss"  # nothing had been stored
    # max-age: only entries younger than N seconds.
    aged = body(unique("Is the sky blue?"))
    first = post(cstack.url, aged)
    wait_stored(cstack, first.json()["id"])
    assert post(cstack.url, aged, **{"cache-control": "max-age=3600"}).headers["x-switchyard-cache"] == "hit"
    wait_for("the entry to be over a second old", lambda: sql(
        cstack, "SELECT 1 FROM response_cache WHERE entry->'response'->>'id' = $1 "
                "AND created_at < now() - interval '1 second'", first.json()["id"]), timeout_s=10)
    assert post(cstack.url, aged, **{"cache-control": "max-age=1"}).headers["x-switchyard-cache"] == "miss"
    # A malformed max-age is the caller's error, in OpenAI's shape.
    bad = post(cstack.url, aged, **{"cache-control": "max-age=soon"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "cache-control"


def _sse(response: httpx.Response) -> list[bytes]:
    frames = response.content.split(b"\n\n")
    assert frames[-1] == b"", "the stream must end with a complete frame"
    assert all(f.startswith(b"data: ") for f in frames[:-1]), frames
    return [f[len(b"data: "):] for f in frames[:-1]]


def test_stream_hits_replay_chunks_in_order(cstack: RunningStack, replica: str, providers: Providers) -> None:
    payload = body(unique("Count from one to five in words."), stream=True)
    first = post(cstack.url, payload)
    assert first.status_code == 200 and first.headers["x-switchyard-cache"] == "miss"
    original = _sse(first)
    assert original[-1] == b"[DONE]" and len(original) > 3
    chunks = [orjson.loads(f) for f in original[:-1]]
    wait_stored(cstack, chunks[0]["id"])
    replayed = post(replica, payload)
    assert replayed.status_code == 200 and replayed.headers["x-switchyard-cache"] == "hit"
    assert replayed.headers["content-type"].startswith("text/event-stream")
    assert _sse(replayed) == original  # the same chunks, bytes and order, the same framing, then [DONE]
    # The assembled answer serves a plain request; usage is added when the stream asks for it.
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    plain = post(cstack.url, {**payload, "stream": False})
    assert plain.headers["x-switchyard-cache"] == "hit"
    assert plain.json()["choices"][0]["message"]["content"] == text
    with_usage = post(cstack.url, {**payload, "stream_options": {"include_usage": True}})
    frames = _sse(with_usage)
    assert with_usage.headers["x-switchyard-cache"] == "hit" and frames[-1] == b"[DONE]"
    assert orjson.loads(frames[-2])["usage"]["completion_tokens"] > 0
    # The OpenAI SDK reads a replayed stream like any other.
    client = openai.OpenAI(base_url=f"{cstack.url}/v1", api_key=MASTER_KEY, max_retries=0)
    sdk = client.chat.completions.create(**payload)
    assert "".join(c.choices[0].delta.content or "" for c in sdk if c.choices) == text
    assert provider_calls(providers) == 1


def test_plain_entry_replays_as_a_stream(cstack: RunningStack, providers: Providers) -> None:
    payload = body(unique("Say hello."))
    first = post(cstack.url, payload)
    wait_stored(cstack, first.json()["id"])
    streamed = post(cstack.url, {**payload, "stream": True})
    assert streamed.headers["x-switchyard-cache"] == "hit"
    frames = _sse(streamed)
    assert frames[-1] == b"[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in map(orjson.loads, frames[:-1]))
    assert text == first.json()["choices"][0]["message"]["content"]
    assert provider_calls(providers) == 1


def test_paraphrase_hits_semantically_and_near_misses_do_not(cstack: RunningStack, replica: str,
                                                             providers: Providers) -> None:
    tag = uuid.uuid4().hex[:8]
    original = f"What is the capital of France? ({tag})"
    paraphrase = f"Tell me France's capital city ({tag})"
    numbers = f"What is the capital of France in 1700? ({tag})"
    negation = f"What is not the capital of France? ({tag})"
    base = random_vector(original)
    providers.embed.vectors.update({original: base, paraphrase: near(base, 0.98, "p"),
                                    numbers: near(base, 0.93, "n"), negation: near(base, 0.90, "x")})
    first = post(cstack.url, body(original))
    assert first.headers["x-switchyard-cache"] == "miss"
    wait_stored(cstack, first.json()["id"])
    client = openai.OpenAI(base_url=f"{replica}/v1", api_key=MASTER_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(**body(paraphrase))
    assert raw.headers["x-switchyard-cache"] == "semantic-hit"
    assert abs(float(raw.headers["x-switchyard-cache-similarity"]) - 0.98) < 0.001
    assert raw.parse().choices[0].message.content == first.json()["choices"][0]["message"]["content"]
    for near_miss in (numbers, negation):
        r = post(cstack.url, body(near_miss))
        assert r.status_code == 200 and r.headers["x-switchyard-cache"] == "miss", near_miss
    assert provider_calls(providers) == 3
    # The embeddings went through Switchyard's own pipeline to the embedding group's provider.
    assert {c.body["input"] for c in providers.embed.calls("/embeddings")} >= {original, paraphrase, numbers}


def test_only_the_last_user_message_may_differ_semantically(cstack: RunningStack, providers: Providers) -> None:
    tag = uuid.uuid4().hex[:8]
    original, paraphrase = f"List three colours ({tag})", f"Name 3 colours ({tag})"
    providers.embed.vectors.update({original: random_vector(original), paraphrase: near(random_vector(original),
                                                                                        0.99, "c")})
    first = post(cstack.url, body(original))
    wait_stored(cstack, first.json()["id"])
    tools = [{"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}]
    other_system = {"model": "cached", "messages": [{"role": "system", "content": "Be verbose."},
                                                    {"role": "user", "content": paraphrase}]}
    for payload in (body(paraphrase, temperature=1.5), other_system, body(paraphrase, n=2),
                    body(paraphrase, tools=tools)):
        r = post(cstack.url, payload)
        assert r.status_code == 200, r.text
        assert r.headers["x-switchyard-cache"] == "miss", payload
    assert post(cstack.url, body(paraphrase)).headers["x-switchyard-cache"] == "semantic-hit"


def test_errors_are_never_cached(cstack: RunningStack, providers: Providers) -> None:
    payload = body(unique("Trigger an error."))
    providers.chat.inject(status=400, message="bad request from upstream")
    failed = post(cstack.url, payload)
    assert failed.status_code == 400 and failed.headers["x-switchyard-cache"] == "miss"
    ok = post(cstack.url, payload)
    assert ok.status_code == 200 and ok.headers["x-switchyard-cache"] == "miss"
    assert provider_calls(providers) == 2


def test_hits_are_usage_rows_with_their_savings(cstack: RunningStack, providers: Providers) -> None:
    key = _key(cstack, team="ledger")
    payload = body(unique("Explain compound interest."))
    first = post(cstack.url, payload, key=key)
    wait_stored(cstack, first.json()["id"])
    hit = post(cstack.url, payload, key=key)
    assert hit.headers["x-switchyard-cache"] == "hit"
    rid = hit.headers["x-request-id"]
    row = wait_for("the hit's usage row", lambda: sql(
        cstack, "SELECT cost_usd, cost_saved_usd, cache_hit, team, model_group, prompt_tokens FROM usage "
                "WHERE request_id = $1", rid))[0]
    assert row["cache_hit"] is True and row["cost_usd"] == 0 and row["cost_saved_usd"] > 0
    assert row["team"] == "ledger" and row["model_group"] == "cached" and row["prompt_tokens"] == 0
    spend = httpx.get(f"{cstack.url}/v1/spend", params={"by": "team", "since": "1h"}, headers=cstack.headers(),
                      timeout=30).json()["data"]
    ledger = next(r for r in spend if r["team"] == "ledger")
    assert ledger["cache_hits"] == 1 and ledger["saved_usd"] > 0
    cli = cstack.cli("spend", "--by", "team", "--since", "1h")
    assert cli.returncode == 0 and "cache_hits" in cli.stdout and "saved_usd" in cli.stdout


def test_store_down_still_answers(cstack: RunningStack, providers: Providers, tmp_path: Path) -> None:
    nowhere = f"postgresql://switchyard:x@127.0.0.1:{free_port()}/switchyard"
    cut_off = _spawn_ingress(cstack, nowhere, 2, tmp_path / "no-store.log")
    try:
        payload = body(unique("Is the cache down?"))
        for stream in (False, True, False):
            r = post(cut_off.url, {**payload, "stream": stream})
            assert r.status_code == 200, r.text
            assert r.headers["x-switchyard-cache"] == "miss"
        assert provider_calls(providers) == 3
    finally:
        cut_off.stop()


def test_other_routes_share_the_cache(cstack: RunningStack, providers: Providers) -> None:
    """/v1/completions and the Anthropic /v1/messages go through the same cache (and the same header)."""
    prompt = unique("Write a haiku about rivers.")
    legacy = {"model": "cached", "prompt": prompt, "max_tokens": 30}
    first = httpx.post(f"{cstack.url}/v1/completions", json=legacy, headers=cstack.headers(), timeout=60)
    assert first.status_code == 200 and first.headers["x-switchyard-cache"] == "miss"
    wait_for("the legacy answer's entry", lambda: sql(
        cstack, "SELECT 1 FROM response_cache WHERE entry->'response'->>'id' = $1",
        first.json()["id"].replace("cmpl-", "chatcmpl-", 1)))
    again = httpx.post(f"{cstack.url}/v1/completions", json=legacy, headers=cstack.headers(), timeout=60)
    assert again.headers["x-switchyard-cache"] == "hit" and again.json()["choices"] == first.json()["choices"]
    client = anthropic.Anthropic(base_url=cstack.url, api_key=MASTER_KEY, max_retries=0)
    messages: list[Any] = [{"role": "user", "content": unique("Hi Claude")}]
    one = client.messages.with_raw_response.create(model="cached", max_tokens=40, messages=messages)
    assert one.headers["x-switchyard-cache"] == "miss"
    text = one.parse().content[0].text  # type: ignore[union-attr]
    wait_for("the messages answer's entry", lambda: sql(
        cstack, "SELECT 1 FROM response_cache WHERE entry->'response'->'choices'->0->'message'->>'content' = $1",
        text))
    two = client.messages.with_raw_response.create(model="cached", max_tokens=40, messages=messages)
    assert two.headers["x-switchyard-cache"] == "hit"
    assert two.parse().content[0].text == text  # type: ignore[union-attr]
    with client.messages.stream(model="cached", max_tokens=40, messages=messages) as stream:
        assert "".join(stream.text_stream) == text
    assert provider_calls(providers) == 2

