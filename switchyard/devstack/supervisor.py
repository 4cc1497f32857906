"""`switchyard up`: the whole gateway on one machine, as supervised child processes.

Starts (unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL point elsewhere) the embedded broker and
PostgreSQL, creates topics, migrates, starts the demo provider when no models are configured,
then ingress, router, one worker pool per provider and accounting (`--replicas` processes per
stage). Ctrl-C / SIGTERM stops everything, children first.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from switchyard.devstack import probe
from switchyard.devstack.broker import EmbeddedBroker, choose_broker, free_port, wait_port
from switchyard.devstack.postgres import EmbeddedPostgres
from switchyard.devstack.tansu_rotation import Ingress, TansuRotation
from switchyard.shared import topics
from switchyard.shared.config import ConfigError, config_path, load_config, secret_variables
from switchyard.shared.kafka import REPLICA_ENV, ensure_topics
from switchyard.shared.settings import STATE_DIR, stack_file
from switchyard.shared.tansu import BROKER_ENV, recreate_topics

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
        _write_stack(stack_file(), data)


def parse_replicas(value: str | None) -> dict[str, int]:
    """`ingress=2,router=2,worker=3` -> counts per stage (1 where not given)."""
    counts = {"ingress": 1, "router": 1, "worker": 1, "accounting": 1}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        name, _, n = item.partition("=")
        name = name.strip()
        if name not in counts or not n.strip().isdigit() or int(n) < 1:
            raise SystemExit(f"--replicas: expected e.g. ingress=2,router=2,worker=3; got {item!r}")
        counts[name] = int(n)
    if counts["ingress"] > topics.PARTITIONS[topics.REPLIES]:
        raise SystemExit(f"--replicas: at most {topics.PARTITIONS[topics.REPLIES]} ingress replicas")
    return counts


def _say(message: str) -> None:
    print(message, flush=True)


def up(args: Any) -> int:
    base = Path.cwd() / STATE_DIR
    (base / "logs").mkdir(parents=True, exist_ok=True)
    stack = Stack(base)
    replicas = parse_replicas(getattr(args, "replicas", None))
    env = dict(os.environ)
    master_key = env.get("SWITCHYARD_MASTER_KEY") or ""
    generated = not master_key
    if generated:
        master_key = "sk-sy-" + secrets.token_urlsafe(24)
    env["SWITCHYARD_MASTER_KEY"] = master_key
    path = config_path(args.config)
    if path is not None:
        env["SWITCHYARD_CONFIG"] = str(path.resolve())
    try:
        config = load_config(str(path) if path else None)
    except ConfigError as e:
        print(f"switchyard: {e}", file=sys.stderr)
        return 2
    secret_vars = secret_variables(path.read_text() if path else None)

    def shutdown(*_: Any) -> None:
        stack.stopping = True

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    try:
        if env.get("KAFKA_BOOTSTRAP_SERVERS"):
            env.setdefault(BROKER_ENV, "kafka")
            _say(f"broker      {env['KAFKA_BOOTSTRAP_SERVERS']} (KAFKA_BOOTSTRAP_SERVERS)")
        else:
            stack.broker = choose_broker(getattr(args, "broker", None), base, _say)
            stack.broker.start()
            env["KAFKA_BOOTSTRAP_SERVERS"] = stack.broker.bootstrap
            env[BROKER_ENV] = stack.broker.kind
            if stack.broker.kind == "kafka":
                _say(f"broker      embedded Apache Kafka on {stack.broker.bootstrap} (data in {base / 'kafka'})")
            else:
                _say(f"broker      embedded Tansu on {stack.broker.bootstrap} (in-memory, development only)")
        if not env.get("DATABASE_URL"):
            stack.postgres = EmbeddedPostgres(base / "pg", free_port())
            stack.postgres.start()
            env["DATABASE_URL"] = stack.postgres.url
            _say(f"database    embedded PostgreSQL on 127.0.0.1:{stack.postgres.port} (data in {base / 'pg'})")
        if not config.models:
            port = free_port()
            env["SWITCHYARD_DEMO_URL"] = f"http://127.0.0.1:{port}/v1"
            demo = Child(
                "demo-provider",
                [sys.executable, "-m", "switchyard.devstack.demo_provider", "--port", str(port)],
                _scoped_env(env, secret_vars),
                base / "logs" / "demo-provider.log",
            )
            demo.start()
            stack.children.append(demo)
            wait_port(port)
            config = load_config(str(path) if path else None) if path else _with_demo(env)
            _say(f"provider    no models configured: `demo` is served by the built-in fake on port {port}")
        bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
        stack.topics = topics.all_topics(config.providers())
        _prepare(bootstrap, env["DATABASE_URL"], stack.topics, _scoped_env(env, secret_vars))
        if stack.broker is not None and stack.broker.loses_data:
            stack.rotation = TansuRotation.from_env(bootstrap, stack.topics, topics.consumer_groups(config.providers()))
        ingress_url = f"http://{_client_host(args.host)}:{args.port}"
        stack.info = {
            "bootstrap_servers": bootstrap, "database_url": env["DATABASE_URL"], "ingress_url": ingress_url,
            "ingress_urls": [f"http://{_client_host(args.host)}:{args.port + i}" for i in range(replicas["ingress"])],
            "master_key": master_key, "pid": os.getpid(), "config": env.get("SWITCHYARD_CONFIG"),
            "broker_kind": env[BROKER_ENV],
        }
        stack.publish()
        cli = [sys.executable, "-m", "switchyard.cli"]
        metrics_urls: dict[str, str] = {}
        stack.info["metrics_urls"] = metrics_urls

        def add(name: str, argv: list[str], replica: int, provider: str | None = None) -> None:
            """A service process; its replica index makes it a static member of its consumer group. Those
            without an HTTP port of their own get a health port, which serves /health, /ready and /metrics.
            Only a `provider`'s workers get that provider's secrets (`_scoped_env`)."""
            if argv[0] == "ingress":
                metrics_urls[name] = f"http://{_client_host(args.host)}:{argv[argv.index('--port') + 1]}/metrics"
            else:
                port = free_port()
                argv = [*argv, "--health-port", str(port)]
                metrics_urls[name] = f"http://127.0.0.1:{port}/metrics"
            stack.children.append(Child(name, [*cli, *argv],
                                        {**_scoped_env(env, secret_vars, provider), REPLICA_ENV: str(replica)},
                                        base / "logs" / f"{name}.log"))

        for i in range(replicas["ingress"]):
            add(f"ingress-{i}", ["ingress", "--host", args.host, "--port", str(args.port + i),
                                   "--reply-partition", str(i)], i)
        for i in range(replicas["router"]):
            add(f"router-{i}", ["router"], i)
        for provider in config.providers():
            for i in range(replicas["worker"]):
                add(f"worker-{provider}-{i}", ["worker", "--provider", provider], i, provider)
        for i in range(replicas["accounting"]):
            add(f"accounting-{i}", ["accounting"], i)
        for child in stack.children:
            if not child.alive():
                child.start()
        stack.publish()
        ports = [args.port + i for i in range(replicas["ingress"])]
        _wait_ready(stack, [f"http://{_client_host(args.host)}:{port}" for port in ports])
        extra = f" (one replica per port: {ports[0]}-{ports[-1]})" if len(ports) > 1 else ""
        _say(f"ingress     {ingress_url}/v1{extra}")
        _say(f"models      {', '.join(m.name for m in config.models)}")
        _say(f"master key  {master_key}" + ("  (generated; set SWITCHYARD_MASTER_KEY to choose one)"
                                             if generated else ""))
        _say(f"logs        {base / 'logs'}")
        _say("Switchyard is up. Ctrl-C stops it.")
        _supervise(stack)
    except Exception as e:  # noqa: BLE001 - report any start-up failure plainly, then clean up
        print(f"switchyard: could not start: {e}", file=sys.stderr)
        _teardown(stack)
        return 1
    _teardown(stack)
    return 0


def _scoped_env(env: dict[str, str], secret_vars: dict[str, set[str]], provider: str | None = None) -> dict[str, str]:
    """`env` without any provider's secrets but `provider`'s own (issue 18): ingress, the router, accounting,
    the migration and the demo provider start with none, a worker with its own provider's only, so a process
    that is compromised (ingress faces the internet) holds no key it does not use."""
    own = secret_vars.get(provider, set()) if provider else set()
    withheld = set().union(*secret_vars.values()) - own
    return {name: value for name, value in env.items() if name not in withheld}


def _with_demo(env: dict[str, str]) -> Any:
    os.environ["SWITCHYARD_DEMO_URL"] = env["SWITCHYARD_DEMO_URL"]
    return load_config(None)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _prepare(bootstrap: str, database_url: str, wanted: dict[str, int], env: dict[str, str]) -> None:
    """Create the topics, and migrate the database in a child process (`switchyard migrate`), so SQLAlchemy
    and Alembic never take up the long-lived supervisor's memory."""
    asyncio.run(ensure_topics(bootstrap, wanted))
    result = subprocess.run(
        [sys.executable, "-m", "switchyard.cli", "migrate"],
        env={**env, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"database migration failed: {(result.stderr or result.stdout).strip()[-2000:]}")


def _write_stack(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # O_EXCL below: never write into a file someone else opened or linked
    # Created 0600, before a byte is written: it holds the master key, readable by no one else at any moment.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    tmp.replace(path)


def _wait_ready(stack: Stack, urls: list[str], timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    pending = list(urls)
    while pending:
        if time.time() > deadline:
            raise TimeoutError(f"ingress not ready after {timeout_s}s; see {stack.base / 'logs'}")
        for child in stack.children:
            if child.proc is not None and child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode}; see {child.log_path}")
        if probe.get(f"{pending[0]}/ready")[0] == 200:
            pending.pop(0)
            continue
        time.sleep(0.1)


def _supervise(stack: Stack) -> None:
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
        broker.proc.terminate()
        try:
            broker.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            broker.proc.kill()
            broker.proc.wait()
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


def _teardown(stack: Stack) -> None:
    _say("stopping...")
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
    if stack.broker is not None and stack.broker.proc is not None and stack.broker.proc.poll() is None:
        stack.broker.proc.terminate()
        try:
            stack.broker.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            stack.broker.proc.kill()
            stack.broker.proc.wait()
    stack_file().unlink(missing_ok=True)
    _say("stopped.")
