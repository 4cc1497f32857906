"""The Tansu fallback does not fail with use: long streams in a loop, across several rotations of the broker.

Tansu keeps every message in memory and slows down on long logs; `switchyard up` rotates it (restarts it
empty) once its logs hold SWITCHYARD_TANSU_ROTATE_MESSAGES, while ingress holds new requests and only when
nothing acknowledged is unprocessed (switchyard/devstack/tansu_rotation.py). Here the threshold is low, so a
minute of long streams from a few concurrent clients goes through several rotations: every stream must come
back whole and in order, no request may fail, and the broker's memory must stay bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from switchyard.devstack.tansu_rotation import CHECK_ENV, ROTATE_ENV, rss_kb
from switchyard.shared.settings import read_stack
from tests.stack import MASTER_KEY, RunningStack, start_stack, warm_up

THRESHOLD = 800
"""Messages in the broker's logs that trigger a rotation: a few dozen long streams' worth."""
ROTATIONS = 2
WORDS = 150
"""Words per streamed answer: the demo model streams one chunk per word, each chunk one Kafka message."""
CLIENTS = 3
SOAK_S = 100.0
RSS_BUDGET_KB = 40 * 1024
"""How far above its fresh size the broker's memory may grow (3,000 messages cost it ~4 MB; without rotation
the soak's tens of thousands of messages would keep adding ~1 KB each, for as long as it runs)."""


@pytest.fixture(scope="module")
def soak_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    cwd = tmp_path_factory.mktemp("tansu-soak")
    running = start_stack(cwd, None, extra_env={ROTATE_ENV: str(THRESHOLD), CHECK_ENV: "0.5"}, broker="tansu")
    try:
        warm_up(running, "demo")
        yield running
    finally:
        assert running.stop() == 0, running.log()[-3000:]


def _rotation(stack: RunningStack) -> dict[str, Any]:
    return dict(read_stack(stack.cwd).get("tansu_rotation") or {})


def _service_warnings(stack: RunningStack) -> list[str]:
    """The services' warnings and errors, for a failure's message (the temporary folder is gone after CI)."""
    lines = []
    for path in sorted((stack.cwd / ".switchyard" / "logs").glob("*.log")):
        lines += [f"{path.name}: {line[:300]}" for line in path.read_text(errors="replace").splitlines()
                  if '"level":"warning"' in line or '"level":"error"' in line]
    return lines[-60:]


def _broker_pid(stack: RunningStack) -> int | None:
    broker = read_stack(stack.cwd).get("broker") or {}
    return broker.get("pid")


def test_long_streams_stay_whole_across_rotations_and_the_broker_stays_small(soak_stack: RunningStack) -> None:
    client = OpenAI(base_url=f"{soak_stack.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=120)
    base_pid = _broker_pid(soak_stack)
    base_rss = rss_kb(base_pid)
    assert base_rss is not None
    failures: list[str] = []
    done: list[int] = []
    pids: set[int] = set()
    peak_rss = [base_rss]
    stop = threading.Event()

    def soak(worker: int) -> None:
        n = 0
        while not stop.is_set():
            prompt = " ".join(f"c{worker}-s{n}-word{i:03d}" for i in range(WORDS))
            try:
                if n % 5 == 4:
                    answer = client.chat.completions.create(model="demo",
                                                            messages=[{"role": "user", "content": prompt}])
                    text = answer.choices[0].message.content or ""
                else:
                    stream = client.chat.completions.create(model="demo", stream=True,
                                                            messages=[{"role": "user", "content": prompt}])
                    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            except Exception as e:  # noqa: BLE001 - any failure is what this test reports
                failures.append(f"client {worker} request {n}: {e!r}")
                return
            if text != f"Echo: {prompt}":
                failures.append(f"client {worker} request {n}: text not whole and in order: {text[:200]!r}...")
                return
            done.append(1)
            n += 1

    threads = [threading.Thread(target=soak, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    deadline = time.time() + SOAK_S
    try:
        while time.time() < deadline and not failures and _rotation(soak_stack).get("rotations", 0) < ROTATIONS:
            pid = _broker_pid(soak_stack)
            rss = rss_kb(pid)
            if pid is not None and rss is not None:
                pids.add(pid)
                peak_rss.append(rss)
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=150)
    status = _rotation(soak_stack)
    assert not failures, (failures, status, _service_warnings(soak_stack), soak_stack.log()[-2000:])
    assert status.get("rotations", 0) >= ROTATIONS, (status, len(done), soak_stack.log()[-3000:])
    assert "rotated the embedded Tansu broker" in soak_stack.log()
    assert len(pids) >= ROTATIONS, pids  # each rotation is a fresh broker process
    assert max(peak_rss) - base_rss < RSS_BUDGET_KB, (base_rss, max(peak_rss), status)
    # After the soak the stack still answers, on the rotated broker, and ingress holds nothing.
    answer = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "after"}])
    assert answer.choices[0].message.content == "Echo: after"
    health = httpx.get(f"{soak_stack.url}/health", timeout=5).json()
    assert health["held"] is False and health["waiting"] == 0
