"""Starting and stopping what the benchmark measures: the fake provider, Switchyard, LiteLLM proxy.

Each target runs alone while it is measured (an idle Switchyard still polls Kafka; it must not
steal CPU from LiteLLM's run, nor the reverse), always against the same fake provider process.
Each exposes `roots` (pids whose process trees are its cost) and an `Endpoint` for the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from loadgen import Endpoint, one_request

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / ".work"
LITELLM_VENV = BENCH / ".venv-litellm"
SWITCHYARD_KEY = "sk-bench"
LITELLM_KEY = "sk-bench-litellm-7f3a"  # LiteLLM refuses to be benchmarked with its default sk-1234
MODEL = "bench"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process (its own session), then SIGKILL its process group after the grace."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class FakeProvider:
    """bench/fake_openai.py in its own process (so its CPU is measured apart from the client's)."""

    def __init__(self, stream_chunks: int = 16, chunk_gap_ms: float = 2.0) -> None:
        self.stream_chunks = stream_chunks
        self.chunk_gap_ms = chunk_gap_ms
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "fake_openai.py"), "--port", "0", "--stream-chunks",
             str(self.stream_chunks), "--chunk-gap-ms", str(self.chunk_gap_ms)],
            stdout=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("ready "):
            raise RuntimeError(f"fake provider did not start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def endpoint(self) -> Endpoint:
        return Endpoint("fake-direct", "127.0.0.1", self.port, "gpt-4o-mini", api_key="x")

    def stop(self) -> None:
        if self.proc:
            _stop(self.proc, 5)


class Switchyard:
    """`switchyard up` (embedded broker + PostgreSQL + every service) in a scratch folder under bench/.work.

    `broker` is passed to `up --broker` (None: `up` chooses, which is Apache Kafka where Java is installed)."""

    def __init__(self, api_base: str, extra_env: dict[str, str] | None = None, repo: Path | None = None,
                 broker: str | None = None, name: str = "switchyard") -> None:
        self.name = name
        self.broker = broker
        self.api_base = api_base
        self.extra_env = extra_env or {}
        self.pythonpath = str(repo) if repo else str(REPO)
        """What the services import first (PYTHONPATH, `:`-separated): a patched copy of the source tree
        measures a proposed change; a second entry may hold a library the change needs."""
        WORK.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="switchyard-", dir=WORK))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout_s: float = 240.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "bench.yaml").write_text(
            f"models:\n  - name: {MODEL}\n    deployments:\n      - provider: openai\n        model: gpt-4o-mini\n"
            f"        api_base: {self.api_base}\n        api_key: x\n")
        env = {k: v for k, v in os.environ.items()
               if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "SWITCHYARD_CONFIG")}
        pythonpath = ":".join(str(Path(p).resolve()) for p in self.pythonpath.split(":"))
        env.update({"SWITCHYARD_MASTER_KEY": SWITCHYARD_KEY, "PYTHONPATH": pythonpath, **self.extra_env})
        self.port = free_port()
        out = open(self.dir / "up.out", "wb")  # noqa: SIM115 - owned by the child
        broker = ["--broker", self.broker] if self.broker else []
        self.proc = subprocess.Popen([sys.executable, "-m", "switchyard.cli", "up", "--port", str(self.port),
                                      "--config", "bench.yaml", *broker], cwd=self.dir, env=env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        deadline = time.time() + timeout_s
        while "Switchyard is up" not in self.log():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop(keep=True)  # keep the logs to read
                raise RuntimeError(f"switchyard up failed:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        path = self.dir / "up.out"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def roots(self) -> list[int]:
        """The supervisor (parent of broker and services) and the detached PostgreSQL postmaster."""
        out = [self.proc.pid] if self.proc else []
        pidfile = self.dir / ".switchyard" / "pg" / "data" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            out.append(int(pidfile.read_text().split()[0]))
        return out

    def service_pids(self) -> dict[str, int]:
        """Label -> pid of each Python service (for the profiler)."""
        from procstat import label_for, tree

        skip = {"supervisor", "broker", "postgres"}
        return {label_for(pid): pid for pid in tree(self.roots)
                if label_for(pid) not in skip and self.proc and pid != self.proc.pid}

    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, "127.0.0.1", self.port, MODEL, api_key=SWITCHYARD_KEY)

    def metric(self, name: str) -> dict[str, float]:
        """An unlabelled metric's value on each service's /metrics (ingress serves it on its own port, the
        others on their health ports); a service that does not answer is left out."""
        from procstat import cmdline

        ports = {"ingress": self.port}
        for label, pid in self.service_pids().items():
            argv = cmdline(pid)
            if "--health-port" in argv:
                ports[label] = int(argv[argv.index("--health-port") + 1])
        values: dict[str, float] = {}
        for label, port in ports.items():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                    text = answer.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith(f"{name} "):
                    values[label] = float(line.split()[1])
        return values

    def stop(self, keep: bool = False) -> None:
        """Stop the stack; its scratch folder (PostgreSQL data, logs) goes too unless `keep`."""
        if self.proc:
            _stop(self.proc, 40)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


class LiteLLM:
    """LiteLLM proxy, 1 worker, from its own venv (bench/.venv-litellm), against the same fake."""

    name = "litellm"

    def __init__(self, api_base: str) -> None:
        self.api_base = api_base
        WORK.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="litellm-", dir=WORK))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @staticmethod
    def available() -> bool:
        return (LITELLM_VENV / "bin" / "litellm").exists()

    @staticmethod
    def version() -> str:
        try:
            out = subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-c",
                                  "import importlib.metadata as m; print(m.version('litellm'))"],
                                 capture_output=True, text=True, timeout=30)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    def start(self, timeout_s: float = 300.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "litellm.yaml"
        cfg.write_text(
            f"model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
            f"      api_base: {self.api_base}\n      api_key: x\n"
            f"general_settings:\n  master_key: {LITELLM_KEY}\n"
            "litellm_settings:\n  telemetry: false\n  set_verbose: false\n  json_logs: false\n")
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY")}
        env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                    "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"})
        self.port = free_port()
        out = open(self.dir / "litellm.out", "wb")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen([str(LITELLM_VENV / "bin" / "litellm"), "--config", str(cfg), "--host",
                                      "127.0.0.1", "--port", str(self.port), "--num_workers", "1"],
                                     cwd=self.dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()
        deadline = time.time() + timeout_s
        while True:
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop(keep=True)  # keep the logs to read
                raise RuntimeError(f"litellm failed to start:\n{self.log()[-3000:]}")
            try:
                answer = asyncio.run(one_request(self.endpoint(), timeout_s=10))
                if answer.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)

    def log(self) -> str:
        path = self.dir / "litellm.out"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, "127.0.0.1", self.port, MODEL, api_key=LITELLM_KEY)

    def stop(self, keep: bool = False) -> None:
        if self.proc:
            _stop(self.proc, 20)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)
