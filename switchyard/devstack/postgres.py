"""The embedded PostgreSQL for local use: the system's server binaries, data under .switchyard/pg.

`initdb` refuses to run as root, so as root the cluster is created and run as the
`postgres` system user. Where no server binaries exist, install Debian's `postgresql`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from switchyard.devstack.broker import PORT_ATTEMPTS, free_port, log_says_port_taken, log_size

PG_BIN_ENV = "SWITCHYARD_PG_BIN"
DB_NAME = "switchyard"
DB_USER = "switchyard"


def pg_bin_dir() -> Path:
    """SWITCHYARD_PG_BIN, else the newest /usr/lib/postgresql/<v>/bin, else the folder of `pg_ctl` on PATH."""
    explicit = os.environ.get(PG_BIN_ENV)
    if explicit:
        return Path(explicit)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise FileNotFoundError(f"no PostgreSQL server binaries: `apt-get install postgresql` or set {PG_BIN_ENV}")


def _as_postgres_user() -> list[str]:
    """Prefix for running server binaries: as root, run them as the `postgres` user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
    return ["runuser", "-u", "postgres", "--"]


def _chown_for_server(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)
        # The server must be able to reach its data folder through every parent.
        for parent in path.parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)


class EmbeddedPostgres:
    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.data = base / "data"
        self.socket_dir = base / "run"
        self.port = port
        self.bin = pg_bin_dir()

    @property
    def url(self) -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run a server binary (as `postgres` when root); a failure raises with what the binary said."""
        result = subprocess.run([*_as_postgres_user(), *args], capture_output=True)
        if check and result.returncode != 0:
            said = (result.stderr or result.stdout).decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"{Path(args[0]).name} failed (exit {result.returncode}): {said}")
        return result

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        for path in (self.base, self.socket_dir):
            _chown_for_server(path)
        if not (self.data / "PG_VERSION").exists():
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", DB_USER, "--auth=trust", "-E", "UTF8",
                      "--no-instructions")
        self.stop(quiet=True)  # a server left over from a killed run
        log = self.base / "postgres.log"
        for attempt in range(PORT_ATTEMPTS):
            opts = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=on"
            logged = log_size(log)
            result = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(log), "-w",
                               "-t", "60", "start", check=False)
            if result.returncode == 0:
                break
            if attempt + 1 < PORT_ATTEMPTS and log_says_port_taken(log, logged):
                self.port = free_port()  # taken between choosing it and binding it: choose again
                continue
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr.decode()[-2000:]} (log: {log})")
        exists = self._run(str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, "-d",
                           "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{DB_NAME}'")
        if exists.stdout.strip() != b"1":
            self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, DB_NAME)

    def stop(self, quiet: bool = False) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=not quiet)
