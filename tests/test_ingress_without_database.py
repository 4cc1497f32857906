"""An ingress replica without PostgreSQL: it starts, serves the master key, answers what it cannot check with a
503 + Retry-After (never a 500 or a 401), limits keys on its own count, and resumes by itself.

Real processes only: `switchyard ingress` replicas on the session stack's broker (so the stack's router and
workers answer them), pointed at a port where nothing listens, at a port that accepts connections and never
answers, or at a throwaway embedded PostgreSQL that this module stops and starts again.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import pytest

from switchyard.devstack.postgres import EmbeddedPostgres
from switchyard.shared.db import upgrade_blocking
from tests.fakes.server import free_port
from tests.stack import MASTER_KEY, RunningStack, _child_env

FIRST_PARTITION = 8
"""Reply partitions 8.. of llm.replies: the stack's ingress owns 0, tests/test_keys.py's second replica 1."""


@dataclass
class Ingress:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, text: str) -> int:
        return sum(1 for line in self.log().splitlines() if text in line)


Spawn = Callable[[str], Ingress]


@pytest.fixture
def spawn(stack: RunningStack, tmp_path: Path) -> Iterator[Spawn]:
    """Start `switchyard ingress` replicas on the stack's broker with a given DATABASE_URL (each its own
    reply partition); returns once /health answers. All are stopped at the end of the test."""
    started: list[Ingress] = []

    def start(database_url: str) -> Ingress:
        port, partition = free_port(), FIRST_PARTITION + len(started)
        env = _child_env({"KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap, "DATABASE_URL": database_url,
                          "SWITCHYARD_CONFIG": str(stack.cwd / "switchyard.yaml"),
                          "TEST_UPSTREAM_KEY": "sk-upstream-secret"})
        log_path = tmp_path / f"ingress-{partition}.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "switchyard.cli", "ingress", "--port", str(port),
                                     "--reply-partition", str(partition)], env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        ingress = Ingress(proc, f"http://127.0.0.1:{port}", log_path)
        started.append(ingress)
        deadline = time.time() + 120  # generous: shared CI machines are slow to start Python processes
        while True:
            assert proc.poll() is None, f"ingress exited ({proc.returncode}) without PostgreSQL:\n{ingress.log()}"
            try:
                if httpx.get(f"{ingress.url}/health", timeout=1).status_code == 200:
                    return ingress
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, f"ingress did not start:\n{ingress.log()}"
            time.sleep(0.1)

    yield start
    for ingress in started:
        ingress.proc.terminate()
    for ingress in started:
        try:
            ingress.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            ingress.proc.kill()
            ingress.proc.wait()


def chat(url: str, key: str) -> httpx.Response:
    tag = uuid.uuid4().hex[:8]
    r = httpx.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                   json={"model": "gpt-test", "messages": [{"role": "user", "content": f"question {tag}"}]})
    assert r.status_code != 500, r.text
    if r.status_code == 200:
        assert r.json()["choices"][0]["message"]["content"] == f"Echo: question {tag}"
    return r


def wait_ready(ingress: Ingress, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{ingress.url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert ingress.proc.poll() is None, ingress.log()
        assert time.time() < deadline, f"ingress not ready after {timeout_s}s:\n{ingress.log()[-3000:]}"
        time.sleep(0.1)


def assert_unavailable(r: httpx.Response, code: str) -> None:
    """A 503 with an OpenAI-style body naming why, and a Retry-After of a few seconds."""
    assert r.status_code == 503, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["type"] == "service_unavailable_error" and error["code"] == code, error
    assert 1 <= int(r.headers["retry-after"]) <= 10, r.headers


def assert_admin_unavailable(ingress: Ingress, every: bool = True) -> None:
    master = {"authorization": f"Bearer {MASTER_KEY}"}
    assert_unavailable(httpx.post(f"{ingress.url}/v1/keys", json={"name": "x"}, headers=master, timeout=60),
                       "database_unavailable")
    if every:
        assert_unavailable(httpx.get(f"{ingress.url}/v1/keys", headers=master, timeout=60), "database_unavailable")
        assert_unavailable(httpx.get(f"{ingress.url}/v1/spend", headers=master, timeout=60), "database_unavailable")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never answers (a hung server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("database", ["refused", "silent"])
def test_ingress_starts_and_serves_without_postgresql(stack: RunningStack, spawn: Spawn, database: str,
                                                      request: pytest.FixtureRequest) -> None:
    key = httpx.post(f"{stack.url}/v1/keys", json={"rpm": 100}, headers=stack.headers(), timeout=30).json()
    port = free_port() if database == "refused" else request.getfixturevalue("silent_port")
    ingress = spawn(f"postgresql://switchyard@127.0.0.1:{port}/switchyard")

    # The master key works at once, answered through the stack's router and workers.
    assert chat(ingress.url, MASTER_KEY).status_code == 200
    ready = httpx.get(f"{ingress.url}/ready", timeout=5)
    assert ready.status_code == 503 and ready.json() == {"ready": False, "keys_loaded": False}, ready.text
    assert httpx.get(f"{ingress.url}/health", timeout=5).status_code == 200

    # A virtual key (a valid one) cannot be checked yet: 503 + Retry-After, not a 401, not a 500.
    for _ in range(3):
        assert_unavailable(chat(ingress.url, key["key"]), "keys_unavailable")
    r = httpx.post(f"{ingress.url}/v1/messages", headers={"x-api-key": key["key"]}, timeout=30,
                   json={"model": "gpt-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and 1 <= int(r.headers["retry-after"]) <= 10, r.text
    assert r.json()["type"] == "error"
    # A token that is no virtual key at all needs no database to be refused.
    assert chat(ingress.url, "sk-wrong").status_code == 401
    assert_admin_unavailable(ingress, every=database == "refused")  # a silent server costs a connect timeout each

    assert ingress.proc.poll() is None
    assert chat(ingress.url, MASTER_KEY).status_code == 200
    assert httpx.get(f"{ingress.url}/ready", timeout=5).status_code == 503
    assert ingress.count("PostgreSQL unreachable for virtual keys") == 1, ingress.log()[-3000:]


async def _counter(database_url: str, key_id: str, window: int) -> int | None:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        value = await conn.fetchval("SELECT used FROM rate_counters WHERE key_id = $1 AND kind = 'requests' "
                                    "AND window_start = $2", key_id, datetime.fromtimestamp(window, UTC))
    finally:
        await conn.close()
    return None if value is None else int(value)


def counter(database_url: str, key_id: str, window: int) -> int | None:
    """The shared RPM counter of a key in one minute window (what the replicas reserved there)."""
    return asyncio.run(_counter(database_url, key_id, window))


def window_now() -> int:
    return int(time.time() // 60) * 60


def test_a_postgresql_outage_degrades_limits_and_everything_resumes(spawn: Spawn, tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg", free_port())
    pg.start()
    try:
        upgrade_blocking(pg.url)
        a = spawn(pg.url)
        wait_ready(a)
        master = {"authorization": f"Bearer {MASTER_KEY}"}
        created = httpx.post(f"{a.url}/v1/keys", json={"rpm": 6}, headers=master, timeout=30)
        assert created.status_code == 201, created.text
        key, key_id = created.json()["key"], created.json()["key_id"]
        if time.time() % 60 > 35:  # what follows should fit in one minute window (it is checked below)
            time.sleep(61 - time.time() % 60)

        w0 = window_now()
        assert chat(a.url, key).status_code == 200  # reserves a block of 1 (5% of 6) in PostgreSQL
        assert counter(pg.url, key_id, w0) == 1

        pg.stop()
        statuses = [chat(a.url, key) for _ in range(8)]
        one_window = window_now() == w0
        codes = [r.status_code for r in statuses]
        if one_window:  # this replica's own count: the whole limit (6) in the window, the first one included
            assert codes == [200] * 5 + [429] * 3, codes
        else:  # the burst straddled two windows: each has its own count
            assert set(codes) <= {200, 429} and codes.count(200) >= 5, codes
        limited = next(r for r in statuses if r.status_code == 429)
        assert limited.json()["error"]["code"] == "rate_limit_exceeded" and int(limited.headers["retry-after"]) >= 1
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
        assert a.count("PostgreSQL unreachable for rate limits") == 1, a.log()[-3000:]  # once, not per request
        # A token not among the loaded keys is refused from memory (keys are only created through PostgreSQL);
        # the admin API needs the database.
        unknown = chat(a.url, "sk-sy-" + uuid.uuid4().hex)
        assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "invalid_api_key", unknown.text
        assert_admin_unavailable(a)

        b = spawn(pg.url)  # a replica started during the outage
        assert httpx.get(f"{b.url}/ready", timeout=5).status_code == 503
        assert chat(b.url, MASTER_KEY).status_code == 200
        assert_unavailable(chat(b.url, key), "keys_unavailable")

        pg.start()
        wait_ready(b)  # it loads the keys once PostgreSQL answers, by itself
        assert b.count("virtual keys loaded") == 1

        # Replica A goes back to shared reservations, adding what it admitted on its own count meanwhile.
        deadline = time.time() + 30
        while True:
            window = window_now()
            r = chat(a.url, key)
            if window == window_now():
                expected = 6 if one_window and window == w0 else 1
                if (counter(pg.url, key_id, window) or 0) >= expected:
                    break
            assert time.time() < deadline, (r.status_code, counter(pg.url, key_id, window), a.log()[-3000:])
            time.sleep(1.0)
        assert a.count("PostgreSQL answers again for rate limits") == 1
        if window == w0 and one_window:
            assert r.status_code == 429 and counter(pg.url, key_id, w0) == 6
            # Replica B sees A's requests in the shared counter: the limit holds across replicas again.
            assert chat(b.url, key).status_code == 429
        else:
            assert r.status_code == 200
            assert chat(b.url, key).status_code in (200, 429)
        assert httpx.get(f"{a.url}/v1/keys/{key_id}", headers=master, timeout=30).status_code == 200
    finally:
        pg.stop(quiet=True)
