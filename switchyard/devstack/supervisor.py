"""`switchyard up`: the whole gateway on one machine, as supervised child processes.

Starts (unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL point elsewhere) the embedded broker and
PostgreSQL, creates topics, migrates, starts the demo provider when no models are configured,
then ingress, router, one worker pool per provider and accounting (`--replicas` processes per
stage). Ctrl-C / SIGTERM stops everything, children first.

The children and the embedded broker are supervised (restarted when they die) by children.py.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from switchyard.devstack import probe
from switchyard.devstack.broker import choose_broker, free_port, wait_port
from switchyard.devstack.children import Child, Stack, say, supervise, teardown
from switchyard.devstack.postgres import EmbeddedPostgres
from switchyard.devstack.tansu_rotation import TansuRotation
from switchyard.shared import topics
from switchyard.shared.config import ConfigError, config_path, load_config, secret_variables
from switchyard.shared.kafka import REPLICA_ENV, ensure_topics
from switchyard.shared.settings import STATE_DIR
from switchyard.shared.tansu import BROKER_ENV


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


MALLOC_ARENAS_ENV = "MALLOC_ARENA_MAX"
MALLOC_ARENAS = "2"
"""glibc's malloc arenas per service process, unless the environment sets its own: the default (eight per core)
gives every thread that allocates its own arena, and the threads a reconnect starts (name lookups, for one)
never give theirs back. After one broker outage (or a pause) the worker stayed 17 MB larger, accounting and the
router 5 MB; with two arenas none grew (bench/README.md)."""


def partitions_cap(replicas: dict[str, int]) -> int | None:
    """SWITCHYARD_PARTITIONS, checked before anything starts: a positive integer, and enough for ingress."""
    try:
        most = topics.most_partitions()
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if most is not None and most < replicas["ingress"]:
        raise SystemExit(f"{topics.PARTITIONS_ENV}={most}: each of the {replicas['ingress']} ingress replicas needs "
                         f"its own {topics.REPLIES} partition")
    return most


def up(args: Any) -> int:
    base = Path.cwd() / STATE_DIR
    (base / "logs").mkdir(parents=True, exist_ok=True)
    stack = Stack(base)
    replicas = parse_replicas(getattr(args, "replicas", None))
    most = partitions_cap(replicas)
    env = {MALLOC_ARENAS_ENV: MALLOC_ARENAS, **os.environ}
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
        else:
            stack.broker = choose_broker(getattr(args, "broker", None), base, say)
        with ThreadPoolExecutor(max_workers=1) as pool:
            # The broker's JVM starts while PostgreSQL starts and is migrated: the two wait on each other for
            # nothing, and together they are most of `up`'s start-up time.
            broker_started = pool.submit(stack.broker.start) if stack.broker is not None else None
            if not env.get("DATABASE_URL"):
                stack.postgres = EmbeddedPostgres(base / "pg", free_port())
                stack.postgres.start()
                env["DATABASE_URL"] = stack.postgres.url
            _migrate(env["DATABASE_URL"], _scoped_env(env, secret_vars))
            if broker_started is not None:
                broker_started.result()
        if stack.broker is None:
            say(f"broker      {env['KAFKA_BOOTSTRAP_SERVERS']} (KAFKA_BOOTSTRAP_SERVERS)")
        else:
            env["KAFKA_BOOTSTRAP_SERVERS"] = stack.broker.bootstrap
            env[BROKER_ENV] = stack.broker.kind
            if stack.broker.kind == "kafka":
                say(f"broker      embedded Apache Kafka on {stack.broker.bootstrap} (data in {base / 'kafka'})")
            else:
                say(f"broker      embedded Tansu on {stack.broker.bootstrap} (in-memory, development only)")
        if stack.postgres is not None:
            say(f"database    embedded PostgreSQL on 127.0.0.1:{stack.postgres.port} (data in {base / 'pg'})")
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
            say(f"provider    no models configured: `demo` is served by the built-in fake on port {port}")
        bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
        providers = config.providers()  # one partition per process of the stage that consumes the topic
        stack.topics = (topics.stack_topics(providers, replicas) if most is None
                        else topics.all_topics(providers, most))
        asyncio.run(ensure_topics(bootstrap, stack.topics))
        if stack.broker is not None and stack.broker.loses_data:
            stack.rotation = TansuRotation.from_env(bootstrap, stack.topics, topics.consumer_groups(providers))
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
        for provider in providers:
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
        say(f"ingress     {ingress_url}/v1{extra}")
        say(f"models      {', '.join(m.name for m in config.models)}")
        say(f"master key  {master_key}" + ("  (generated; set SWITCHYARD_MASTER_KEY to choose one)"
                                             if generated else ""))
        say(f"logs        {base / 'logs'}")
        say("Switchyard is up. Ctrl-C stops it.")
        supervise(stack)
    except Exception as e:  # noqa: BLE001 - report any start-up failure plainly, then clean up
        print(f"switchyard: could not start: {e}", file=sys.stderr)
        teardown(stack)
        return 1
    teardown(stack)
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


def _migrate(database_url: str, env: dict[str, str]) -> None:
    """Migrate the database in a child process (`switchyard migrate`), so SQLAlchemy and Alembic never take up
    the long-lived supervisor's memory."""
    result = subprocess.run(
        [sys.executable, "-m", "switchyard.cli", "migrate"],
        env={**env, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"database migration failed: {(result.stderr or result.stdout).strip()[-2000:]}")


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
