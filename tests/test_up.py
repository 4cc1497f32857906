"""`switchyard up` itself: config errors, and using an existing broker and database instead of its own."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
from aiokafka.admin import AIOKafkaAdminClient

from switchyard.devstack.apache_kafka import EmbeddedKafka
from switchyard.shared import topics
from tests.stack import RunningStack, _child_env, start_stack, warm_up


def test_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "switchyard.yaml").write_text("models:\n  - name: x\n    deployments:\n      - model: m\n")
    result = subprocess.run([sys.executable, "-m", "switchyard.cli", "up", "--port", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=180, env=_child_env())
    assert result.returncode == 2
    assert "models[0].deployments[0].provider" in result.stderr


def test_a_partition_count_that_is_not_a_positive_integer_is_refused_before_anything_starts(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "switchyard.cli", "up", "--port", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, env=_child_env({topics.PARTITIONS_ENV: "0"}))
    assert result.returncode == 1
    assert "SWITCHYARD_PARTITIONS must be a positive integer, not '0'" in result.stderr
    assert not (tmp_path / ".switchyard" / "pg").exists()


def partition_counts(bootstrap: str, names: list[str]) -> dict[str, int]:
    async def describe() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(names)}
        finally:
            await admin.close()

    return asyncio.run(describe())


def test_up_uses_external_broker_and_database(stack: RunningStack, tmp_path: Path) -> None:
    """With KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL set, `up` starts neither broker nor database.

    Its topics have one partition each, as many as each stage has processes; started again with two routers, it
    gives llm.requests a second partition (a new router joining the group hands one to each), and serves."""
    broker = EmbeddedKafka(tmp_path / "kafka", tmp_path / "broker.log")
    broker.start()
    other = start_stack(tmp_path / "second", None, extra_env={"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                                                              "DATABASE_URL": stack.database_url})
    try:
        log = other.log()
        assert "embedded" not in log.split("provider")[0]  # neither an embedded broker nor an embedded database
        assert f"broker      {broker.bootstrap} (KAFKA_BOOTSTRAP_SERVERS)" in log
        assert "`demo` is served by the built-in fake" in log
        assert not (tmp_path / "second" / ".switchyard" / "pg").exists()
        warm_up(other, "demo")
        r = httpx.post(f"{other.url}/v1/chat/completions", headers=other.headers(), timeout=60,
                       json={"model": "demo", "messages": [{"role": "user", "content": "offline"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Echo: offline"
        spend = other.cli("spend", "--by", "provider", "--since", "1h", "--json")
        assert spend.returncode == 0 and '"demo"' in spend.stdout  # the second stack's usage, in the shared DB
        named = [topics.REQUESTS, topics.REPLIES, topics.USAGE, topics.provider_topic("demo")]
        assert partition_counts(broker.bootstrap, named) == dict.fromkeys(named, 1)
        assert other.stop() == 0
        other = start_stack(tmp_path / "second", None, args=("--replicas", "router=2"),
                            extra_env={"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "DATABASE_URL": stack.database_url})
        assert partition_counts(broker.bootstrap, named) == {**dict.fromkeys(named, 1), topics.REQUESTS: 2}
        warm_up(other, "demo")
        r = httpx.post(f"{other.url}/v1/chat/completions", headers=other.headers(), timeout=60,
                       json={"model": "demo", "messages": [{"role": "user", "content": "two routers"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Echo: two routers"
    finally:
        assert other.stop() == 0
        assert broker.proc is not None
        broker.proc.terminate()
        broker.proc.wait()
    assert not (tmp_path / "second" / ".switchyard" / "stack.json").exists()


def test_embedded_postgres_moves_to_another_port_when_its_port_was_taken(tmp_path: Path) -> None:
    import socket

    from switchyard.devstack.broker import free_port
    from switchyard.devstack.postgres import EmbeddedPostgres

    with socket.socket() as taken:  # another process got the chosen port before the server could bind it
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        pg = EmbeddedPostgres(tmp_path / "pg", port)
        pg.start()
        try:
            assert pg.port != port
            assert f"127.0.0.1:{pg.port}/" in pg.url
            with socket.create_connection(("127.0.0.1", pg.port), timeout=5):
                pass
        finally:
            pg.stop()


def test_embedded_kafka_moves_to_other_ports_when_its_port_was_taken(tmp_path: Path) -> None:
    import socket

    from switchyard.devstack.broker import stop_process

    broker = EmbeddedKafka(tmp_path / "kafka", tmp_path / "broker.log")
    broker._choose_ports()  # chosen free, as `start` does; then another process binds one before the JVM does
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", broker.port))
        taken.listen()
        chosen = broker.port
        broker.start()
        try:
            assert broker.port != chosen
            assert f"listeners=PLAINTEXT://127.0.0.1:{broker.port}," in broker.properties.read_text()
            assert "Address already in use" in broker.log_path.read_text()  # the first JVM did meet the taken port
            with socket.create_connection(("127.0.0.1", broker.port), timeout=5):
                pass
        finally:
            stop_process(broker.proc, grace_s=20)


def test_services_run_with_two_malloc_arenas(stack: RunningStack) -> None:
    """`up` starts every service with MALLOC_ARENA_MAX=2 (unless the environment sets it): with glibc's default,
    the threads a reconnect starts keep their own arenas, and a service stays megabytes larger after an outage."""
    import os

    services: dict[str, bool] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if Path(os.readlink(proc / "cwd")) != stack.cwd.resolve():
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"switchyard.cli" in argv:
            command = argv[argv.index(b"switchyard.cli") + 1].decode()
            if command in ("ingress", "router", "worker", "accounting"):
                services[f"{command}[{proc.name}]"] = b"MALLOC_ARENA_MAX=2" in environ
    assert {name.split("[")[0] for name in services} == {"ingress", "router", "worker", "accounting"}, services
    assert all(services.values()), services
