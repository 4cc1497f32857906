"""The supervised processes of `switchyard up`: the children, the embedded broker, and what happens when one dies.

Supervision, so that a local stack survives what the chaos tests do to it:
- a child that dies is restarted (backoff doubles for a crash loop, resets after a healthy run);
- the embedded broker that dies is restarted on the same address. Apache Kafka recovers its log
  from `.switchyard/kafka/` and the services reconnect by themselves: nothing acknowledged is lost.
  Tansu (the fallback) keeps everything in memory, so what it held is lost; its topics are re-created
  while the children are paused (SIGSTOP/SIGCONT), so that none of them makes it auto-create a topic
  with its default partition count first, and their consumers read the new logs from their beginning
  (shared/tansu.py).
- Tansu (no retention) is rotated, restarted empty, once its logs are large, at a moment when nothing
  acknowledged is unprocessed (switchyard/devstack/tansu_rotation.py).
- `.switchyard/stack.json` names every child's pid (rewritten on each restart), the broker's pid
  and the PostgreSQL data folder, so tests and operators can kill or stop exactly one process.
- Stopping stops the children first (SIGTERM, then SIGKILL after STOP_GRACE_S), then PostgreSQL and the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from switchyard.devstack.broker import EmbeddedBroker, stop_process
from switchyard.devstack.postgres import EmbeddedPostgres
from switchyard.devstack.tansu_rotation import Ingress, TansuRotation
from switchyard.shared.settings import stack_file
from switchyard.shared.tansu import recreate_topics

STOP_GRACE_S = 10.0
HEALTHY_RUN_S = 20.0
"""A child that ran this long before dying was not crash-looping: its restart backoff starts over."""


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    """Restarts in a row (the backoff's exponent); reset after a healthy run."""
    total_restarts: int = 0
    started_at: float = 0.0

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        self.started_at = time.time()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Stack:
    base: Path
    children: list[Child] = field(default_factory=list)
    broker: EmbeddedBroker | None = None
    postgres: EmbeddedPostgres | None = None
    stopping: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    """What stack.json says besides the pids (bootstrap, database URL, master key...)."""
    topics: dict[str, int] = field(default_factory=dict)
    """The topics (and partition counts) this stack needs: re-created when the embedded broker restarts."""
    broker_restarts: int = 0
    rotation: TansuRotation | None = None
    """Tansu only: restarts the broker empty once its logs are large (switchyard/devstack/tansu_rotation.py)."""

    def publish(self) -> None:
        """Rewrite stack.json with the current pids (after a start or any restart)."""
        data = dict(self.info)
        data["children"] = {c.name: c.proc.pid for c in self.children if c.proc is not None and c.alive()}
        data["restarts"] = {c.name: c.total_restarts for c in self.children}
        if self.broker is not None and self.broker.proc is not None:
            data["broker"] = {"pid": self.broker.proc.pid, "kind": self.broker.kind, "restarts": self.broker_restarts}
        if self.rotation is not None:
            data["tansu_rotation"] = self.rotation.status()
        if self.postgres is not None:
            data["postgres"] = {"data": str(self.postgres.data), "port": self.postgres.port,
                                "bin": str(self.postgres.bin)}
        write_stack(stack_file(), data)



def say(message: str) -> None:
    print(message, flush=True)

def write_stack(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # O_EXCL below: never write into a file someone else opened or linked
    # Created 0600, before a byte is written: it holds the master key, readable by no one else at any moment.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    tmp.replace(path)


def supervise(stack: Stack) -> None:
    while not stack.stopping:
        restarted = False
        for child in stack.children:
            if stack.stopping:
                break
            if not child.alive():
                code = child.proc.returncode if child.proc else None
                if child.restarts and time.time() - child.started_at >= HEALTHY_RUN_S + _backoff(child.restarts):
                    child.restarts = 0  # it died after a healthy run, not in a crash loop
                if time.time() - child.started_at < _backoff(child.restarts):
                    continue
                child.restarts += 1
                child.total_restarts += 1
                print(f"switchyard: {child.name} exited ({code}); restarting (see {child.log_path})",
                      file=sys.stderr, flush=True)
                child.start()
                restarted = True
        if (stack.broker is not None and stack.broker.proc is not None and stack.broker.proc.poll() is not None
                and not stack.stopping):
            _restart_broker(stack)
            restarted = True
        elif stack.rotation is not None and stack.broker is not None and stack.broker.proc is not None \
                and not stack.stopping:
            restarted = stack.rotation.tick(_ingresses(stack), stack.broker.proc.pid,
                                            lambda still_idle: _rotate_broker(stack, still_idle)) or restarted
        if restarted:
            stack.publish()
        time.sleep(0.2)


def _backoff(restarts: int) -> float:
    """Seconds to wait before restarting a child that has been restarted `restarts` times in a row."""
    return min(30.0, 0.5 * 2 ** min(restarts, 6))


def _signal_children(stack: Stack, sig: int) -> None:
    for child in stack.children:
        if child.alive():
            assert child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, sig)  # each child leads its own session (start_new_session)


def _ingresses(stack: Stack) -> list[Ingress]:
    """Each ingress replica's URL and live process (children `ingress-<i>` serve `ingress_urls[i]`)."""
    urls = stack.info.get("ingress_urls") or []
    children = {c.name: c for c in stack.children}
    out = []
    for i, url in enumerate(urls):
        child = children.get(f"ingress-{i}")
        pid = child.proc.pid if child is not None and child.proc is not None and child.alive() else None
        out.append(Ingress(url, pid))
    return out


def _rotate_broker(stack: Stack, still_idle: Callable[[], bool]) -> bool:
    """Restart Tansu empty, if `still_idle()` says so once the services are paused (see TansuRotation)."""
    broker = stack.broker
    assert broker is not None and broker.proc is not None
    _signal_children(stack, signal.SIGSTOP)
    try:
        if not still_idle():
            return False
        stop_process(broker.proc, STOP_GRACE_S)
        _restart_broker(stack, rotating=True)
        return not stack.stopping
    finally:
        _signal_children(stack, signal.SIGCONT)


def _restart_broker(stack: Stack, rotating: bool = False) -> None:
    """Bring the embedded broker back on the same address (children keep their bootstrap address).

    Apache Kafka recovers its log from disk; the services reconnect by themselves. Tansu comes back
    empty: the children are paused while the gateway's topics are re-created, so that none of them
    makes it auto-create a topic with its default partition count first.
    """
    broker = stack.broker
    assert broker is not None and broker.proc is not None
    code = broker.proc.returncode
    lost = (" It keeps its data in memory: topics, in-flight requests and unstored usage are lost (development "
            "only)." if broker.loses_data else "")
    if not rotating:
        print(f"switchyard: the embedded broker exited ({code}); restarting it on {broker.bootstrap}.{lost}",
              file=sys.stderr, flush=True)
    if broker.loses_data:
        _signal_children(stack, signal.SIGSTOP)
    try:
        broker.start()
        stack.broker_restarts += 0 if rotating else 1
        if broker.loses_data:
            asyncio.run(recreate_topics(broker.bootstrap, stack.topics))
        print(f"switchyard: the embedded broker is back on {broker.bootstrap}; the services resume by themselves",
              file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - a broker that cannot come back stops the stack, plainly
        print(f"switchyard: could not restart the embedded broker: {e}; stopping", file=sys.stderr, flush=True)
        stack.stopping = True
    finally:
        if broker.loses_data:
            _signal_children(stack, signal.SIGCONT)


def teardown(stack: Stack) -> None:
    say("stopping...")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    live = [c for c in stack.children if c.alive()]
    for child in live:
        assert child.proc is not None
        child.proc.terminate()
    deadline = time.time() + STOP_GRACE_S
    for child in live:
        assert child.proc is not None
        try:
            child.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()
    if stack.postgres is not None:
        stack.postgres.stop(quiet=True)
    if stack.broker is not None:
        stop_process(stack.broker.proc, STOP_GRACE_S)
    stack_file().unlink(missing_ok=True)
    say("stopped.")
