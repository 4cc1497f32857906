"""The embedded Apache Kafka broker for local use: one KRaft node (broker and controller in one JVM).

`switchyard kafka install` fetches the broker's jars from Maven Central once, with Maven, into a
cache outside the repository (SWITCHYARD_KAFKA_HOME, else ~/.cache/switchyard/kafka-<version>);
a second run finds them and does nothing. `switchyard up` then runs the broker from those jars with
its data under `.switchyard/kafka/`, so topics, messages and committed offsets survive a restart
of `up` and a SIGKILL of the broker.

The broker is configured for one machine: replication factor 1 everywhere, no initial rebalance
delay (a consumer group forms in milliseconds), few threads, a small heap, topic auto-creation off
as in deploy/ (every topic the gateway uses is created explicitly, with its partition count).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from base64 import urlsafe_b64encode
from collections.abc import Sequence
from pathlib import Path

from switchyard.shared.settings import cache_home
from switchyard.shared.topics import MAX_MESSAGE_BYTES

KAFKA_VERSION = "4.1.1"
"""The pinned Apache Kafka release (Scala 2.13 build); its jars come from Maven Central."""
LOG4J_VERSION = "2.24.3"
"""SLF4J -> Log4j2 binding: the broker's POM leaves it out (the release tarball adds it)."""
KAFKA_HOME_ENV = "SWITCHYARD_KAFKA_HOME"
HEAP_ENV = "SWITCHYARD_KAFKA_HEAP"
MIN_JAVA = 17

_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.switchyard</groupId>
  <artifactId>embedded-kafka</artifactId>
  <version>{KAFKA_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{LOG4J_VERSION}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
logger.kafka.name = kafka.server.KafkaServer
logger.kafka.level = INFO
logger.raft.name = kafka.server.KafkaRaftServer
logger.raft.level = INFO
"""


def kafka_home() -> Path:
    """Where the jars live: SWITCHYARD_KAFKA_HOME, else ~/.cache/switchyard/kafka-<version> (outside the repo)."""
    return cache_home(KAFKA_HOME_ENV, f"kafka-{KAFKA_VERSION}")


def libs_dir() -> Path:
    return kafka_home() / "libs"


def class_archive() -> Path:
    """The broker's class-data archive (AppCDS), made by `build_class_archive`."""
    return kafka_home() / f"classes-{KAFKA_VERSION}.jsa"


def installed() -> bool:
    """True when every jar of the pinned release is in place (the marker is written last)."""
    return (kafka_home() / "installed").is_file() and (libs_dir() / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()


def java_binary() -> str | None:
    """A `java` of version 17 or newer ($JAVA_HOME first, then PATH), or None."""
    home = os.environ.get("JAVA_HOME")
    candidates = [str(Path(home) / "bin" / "java")] if home else []
    found = shutil.which("java")
    if found:
        candidates.append(found)
    for java in candidates:
        if Path(java).is_file() and _java_major(java) >= MIN_JAVA:
            return java
    return None


def _java_major(java: str) -> int:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return 0
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return 0
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major  # "1.8" is Java 8


def install(quiet: bool = False) -> Path:
    """Fetch the broker's jars into `libs_dir()` with Maven; a no-op when they are there already.

    Maven resolves `kafka_2.13` with its runtime dependencies (and keeps its own copy in ~/.m2);
    the jars are copied to a temporary folder that replaces `libs/` only once complete, so an
    interrupted install never looks installed.
    """
    if installed():
        return libs_dir()
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError("Maven (`mvn`) is needed to fetch Apache Kafka's jars: apt-get install maven")
    home = kafka_home()
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(_POM)
    staging = home / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    command = [mvn, "-B", "-q", "-f", str(home / "pom.xml"), "dependency:copy-dependencies",
               "-DincludeScope=runtime", f"-DoutputDirectory={staging}"]
    result = subprocess.run(command, capture_output=quiet, text=True)
    if result.returncode != 0:
        detail = (result.stdout or "")[-2000:] if quiet else ""
        raise RuntimeError(f"Maven could not fetch Apache Kafka {KAFKA_VERSION} (exit {result.returncode}) {detail}")
    shutil.rmtree(libs_dir(), ignore_errors=True)
    staging.rename(libs_dir())
    (home / "log4j2.properties").write_text(_LOG4J2)
    (home / "installed").write_text(KAFKA_VERSION + "\n")
    return libs_dir()


def build_class_archive() -> bool:
    """Start a throwaway node once with `-XX:ArchiveClassesAtExit`, so every later start maps the classes it
    loaded instead of loading them again (Java's dynamic AppCDS). Returns whether the archive is in place.

    Measured on a 2-core machine: a node answered on its port after 2 s and 3.3 s of CPU with the archive,
    4.2 s and 6.6 s without; the test suite and `switchyard up` start many. Nothing else changes: the JIT and
    the heap are as before. A node whose JVM cannot use the archive (another Java build, other jars) says so in
    its log and starts as it would without one.
    """
    from switchyard.devstack.broker import stop_process

    if class_archive().is_file():
        return True
    with tempfile.TemporaryDirectory(dir=kafka_home()) as scratch:
        node = EmbeddedKafka(Path(scratch), Path(scratch) / "broker.log")
        partial = Path(scratch) / "classes.jsa"
        try:
            node.start(jvm_options=[f"-XX:ArchiveClassesAtExit={partial}"])
        except Exception:  # noqa: BLE001 - no archive is a slower start, not a failure
            pass
        finally:
            stop_process(node.proc, grace_s=120)
        if partial.is_file():
            os.replace(partial, class_archive())
    return class_archive().is_file()


def _server_properties(data: Path, port: int, controller_port: int) -> str:
    return f"""# Written by `switchyard up`: one KRaft node for local use (deploy/ has the production settings).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
auto.create.topics.enable=false
message.max.bytes={MAX_MESSAGE_BYTES}
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
num.network.threads=2
num.io.threads=2
background.threads=2
num.recovery.threads.per.data.dir=1
log.retention.hours=24
log.retention.bytes=1073741824
log.segment.bytes=134217728
"""


def _read_ports(properties: Path) -> tuple[int, int] | None:
    if not properties.is_file():
        return None
    text = properties.read_text()
    listeners = re.search(r"^listeners=PLAINTEXT://[^:]+:(\d+),CONTROLLER://[^:]+:(\d+)", text, re.MULTILINE)
    return (int(listeners.group(1)), int(listeners.group(2))) if listeners else None


def _cluster_id() -> str:
    """A Kafka cluster id: a random UUID in URL-safe base64 without padding (what `StorageTool random-uuid` gives).

    Never one that starts with '-' (1 in 64 would): the storage tool's argument parser reads it as an option
    and `up` failed to format the data folder. Kafka's own Uuid.randomUuid draws again in that case too.
    """
    while True:
        found = urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not found.startswith("-"):
            return found


def _bootstrap_checkpoint(java: list[str], properties: Path) -> Path:
    """The storage tool's `bootstrap.checkpoint` (the cluster's initial feature levels), made once per install.

    Its content depends only on the Kafka release and on the node being a single static-quorum voter, which
    every embedded node is; two formats differ only in record timestamps. It is written to a temporary
    folder and moved into place, so two `up`s formatting at once each see a whole file.
    """
    kept = kafka_home() / f"bootstrap-{KAFKA_VERSION}.checkpoint"
    if kept.is_file():
        return kept
    with tempfile.TemporaryDirectory(dir=kafka_home()) as scratch:
        data = Path(scratch) / "data"
        config = Path(scratch) / "server.properties"
        config.write_text(re.sub(r"^log\.dirs=.*$", f"log.dirs={data}", properties.read_text(), flags=re.MULTILINE))
        result = subprocess.run([*java, "kafka.tools.StorageTool", "format", "-t", _cluster_id(),
                                 "-c", str(config), "--ignore-formatted"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"could not format Kafka's data folder: {result.stdout}{result.stderr}")
        os.replace(data / "bootstrap.checkpoint", kept)
    return kept


class EmbeddedKafka:
    """One Apache Kafka node whose data, configuration and ports live in `base` (.switchyard/kafka).

    The ports are chosen once and kept in `server.properties`, so clients that outlive the broker
    (every service, when the supervisor restarts a dead broker) find it again at the same address.
    """

    kind = "kafka"
    loses_data = False

    def __init__(self, base: Path, log_path: Path) -> None:
        self.base = base
        self.log_path = log_path
        self.data = base / "data"
        self.properties = base / "server.properties"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.controller_port = 0
        self.served = False
        """Whether the node has served on its ports: from then on clients know them, and a restart keeps them."""

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _choose_ports(self, keep: bool = True) -> None:
        """Reuse the ports `server.properties` names when they are free (and `keep`), else choose two."""
        from switchyard.devstack.broker import free_port, port_is_free

        kept = _read_ports(self.properties) if keep else None
        if kept and all(port_is_free(p) for p in kept):
            self.port, self.controller_port = kept
        else:
            self.port, self.controller_port = free_port(), free_port()
        self.base.mkdir(parents=True, exist_ok=True)
        self.properties.write_text(_server_properties(self.data.resolve(), self.port, self.controller_port))

    def _java(self) -> list[str]:
        """The JVM's command line: a small heap, the serial collector and only the C1 compiler.

        One node on a developer's machine, next to the gateway: the JVM should cost little CPU. With C2, its
        compiler threads were over half the broker's CPU through the first minutes of load (250 of 480 ms per
        second, 1.2-1.5 ms per gateway request); with `TieredStopAtLevel=1` the broker took 0.85 ms per request
        at the same throughput, the request handlers about 40 % more and the compiler almost nothing.
        """
        java = java_binary()
        if java is None:
            raise RuntimeError(f"Apache Kafka needs Java {MIN_JAVA}+ (none found on PATH or in $JAVA_HOME)")
        if not installed():
            raise RuntimeError("Apache Kafka's jars are not installed: run `switchyard kafka install`")
        home = kafka_home()
        archive = [f"-XX:SharedArchiveFile={class_archive()}"] if class_archive().is_file() else []
        return [java, *archive, f"-Xmx{os.environ.get(HEAP_ENV, '512m')}", "-Xms128m", "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={home / 'log4j2.properties'}", f"-Dkafka.logs.dir={self.base / 'logs'}",
                "-cp", f"{libs_dir()}/*"]

    def _format(self, java: list[str]) -> None:
        """Format the data folder once (a KRaft node needs a cluster id before its first start).

        The storage tool's output is the same for every embedded node but for the ids, so it runs once per
        Kafka install (`_bootstrap_checkpoint`): each new node copies that checkpoint and gets fresh ids. That
        saves a JVM start, seconds on a busy machine, on every first `up` in a fresh folder.
        """
        if (self.data / "meta.properties").is_file():
            return
        checkpoint = _bootstrap_checkpoint(java, self.properties)
        self.data.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint, self.data / "bootstrap.checkpoint")
        (self.data / "meta.properties").write_text(
            f"node.id=1\ndirectory.id={_cluster_id()}\nversion=1\ncluster.id={_cluster_id()}\n")

    def start(self, timeout_s: float = 180.0, jvm_options: Sequence[str] = ()) -> None:
        """Start the node (formatting its data folder the first time) and wait until it serves.
        `jvm_options` go to its JVM before the others (`build_class_archive` adds one).

        On a restart the same ports are used, since clients know them; the log is recovered from disk by the
        broker itself. Before the node first serves, a port another process took between being chosen and the
        JVM binding it makes the node exit: it starts again on fresh ports (up to PORT_ATTEMPTS). The wait is
        long because a JVM start plus log recovery after a kill can take over a minute on a busy 2-core
        machine; a node that exits fails at once, so only a live, slow node uses the whole wait.
        """
        from switchyard.devstack.broker import PORT_ATTEMPTS, log_says_port_taken, log_size

        if self.port == 0:
            self._choose_ports()
        java = self._java()
        self._format(java)
        for attempt in range(PORT_ATTEMPTS):
            logged = log_size(self.log_path)
            log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
            self.proc = subprocess.Popen([java[0], *jvm_options, *java[1:], "kafka.Kafka", str(self.properties)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            try:
                self._wait_started(logged, timeout_s)
                self.served = True
                return
            except RuntimeError:
                may_move = not self.served and attempt + 1 < PORT_ATTEMPTS
                if not (may_move and log_says_port_taken(self.log_path, logged)):
                    raise
                self._choose_ports(keep=False)

    def _wait_started(self, logged: int, timeout_s: float) -> None:
        """Return once this node serves: its log, from `logged` on, says it started, which Kafka writes only
        after its listeners are bound. A port that answers is not enough: it could be another process's, one
        that took it before the JVM could bind it."""
        from switchyard.devstack.broker import log_says

        deadline = time.monotonic() + timeout_s
        while not log_says(self.log_path, logged, b"Kafka Server started"):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the Kafka node exited ({self.proc.returncode}); see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Kafka node did not say it started after {timeout_s}s; see {self.log_path}")
            time.sleep(0.05)
