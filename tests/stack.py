"""Running a real `switchyard up` (embedded Apache Kafka + PostgreSQL + every service) for tests.

SWITCHYARD_TEST_BROKER=tansu runs the same stacks on the Tansu fallback instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer

from switchyard.shared.kafka import topic_partitions
from switchyard.shared.settings import read_stack
from tests.fakes.server import free_port

MASTER_KEY = "sk-test-master"
TEST_BROKER = os.environ.get("SWITCHYARD_TEST_BROKER", "kafka")


@dataclass
class RunningStack:
    cwd: Path
    port: int
    proc: subprocess.Popen[bytes]
    output: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        return str(self.info["database_url"])

    @property
    def bootstrap(self) -> str:
        return str(self.info["bootstrap_servers"])

    def headers(self, key: str = MASTER_KEY) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    def cli(self, *args: str, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `switchyard ...` in the stack's folder, as a user would next to `switchyard up`."""
        return subprocess.run([sys.executable, "-m", "switchyard.cli", *args], cwd=self.cwd, capture_output=True,
                              text=True, timeout=timeout, env=env or _child_env())

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL",
                                                              "SWITCHYARD_CONFIG")}
    env["SWITCHYARD_MASTER_KEY"] = MASTER_KEY
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    env.setdefault("SWITCHYARD_AUTH_FAILURE_LIMIT", "1000000")  # every test client shares one address
    env.update(extra or {})
    return env


def start_stack(cwd: Path, config_yaml: str | None, extra_env: dict[str, str] | None = None,
                args: tuple[str, ...] = (), timeout_s: float = 180.0,
                broker: str | None = TEST_BROKER) -> RunningStack:
    """`switchyard up` in `cwd`; `broker` is passed as `--broker` (None: let `up` choose) unless the stack
    uses an external broker."""
    cwd.mkdir(parents=True, exist_ok=True)
    if config_yaml is not None:
        (cwd / "switchyard.yaml").write_text(config_yaml)
    port = free_port()
    output = cwd / "up.out"
    if broker is not None and "KAFKA_BOOTSTRAP_SERVERS" not in (extra_env or {}):
        args = ("--broker", broker, *args)
    with output.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "switchyard.cli", "up", "--port", str(port), *args], cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, env=_child_env(extra_env),
                                start_new_session=True)
    stack = RunningStack(cwd, port, proc, output)
    deadline = time.time() + timeout_s
    while "Switchyard is up" not in stack.log():
        if proc.poll() is not None or time.time() > deadline:
            stack.stop()
            raise RuntimeError(f"switchyard up failed:\n{stack.log()}")
        time.sleep(0.1)
    stack.info = read_stack(cwd)
    return stack


def warm_up(stack: RunningStack, model: str, timeout_s: float = 120.0) -> None:
    """Wait until the router and the model's worker pool have joined their groups and answer."""
    deadline = time.time() + timeout_s
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "warm up"}]})
    last = None
    while time.time() < deadline:
        try:
            r = httpx.post(f"{stack.url}/v1/chat/completions", content=body, headers=stack.headers(), timeout=30)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise RuntimeError(f"stack did not answer {model}: {last}")


async def read_topic_until(bootstrap: str, topic: str, found: Callable[[list[bytes]], bool],
                           timeout_s: float = 60.0) -> list[bytes]:
    """Every message of `topic` (all partitions, from the beginning) once `found(messages)` holds."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        parts = await topic_partitions(consumer, topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        messages: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while not found(messages):
            assert time.monotonic() < deadline, f"{topic} never showed what was expected ({len(messages)} read)"
            for records in (await consumer.getmany(timeout_ms=500)).values():
                messages += [r.value or b"" for r in records]
        return messages
    finally:
        await consumer.stop()
