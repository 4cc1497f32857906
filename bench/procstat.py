"""CPU time and memory of a target's whole process tree, read from /proc (Linux only).

Why /proc and not psutil: no extra dependency, and we need two things psutil hides —
`cutime`/`cstime` (CPU of children that already exited and were reaped, e.g. short-lived
PostgreSQL backends or pg_ctl helpers), and `VmHWM` (the kernel's own peak-RSS mark, so a
peak between two samples is not missed).

A target is described by its root pids (for Switchyard: the `switchyard up` supervisor, which
parents the broker and every service, plus the PostgreSQL postmaster, which `pg_ctl` detached);
every descendant alive at snapshot time is counted.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcTimes:
    """One process at one instant; times in ms."""

    pid: int
    ppid: int
    label: str
    own_ms: float
    reaped_children_ms: float
    start_ticks: int


def _read_stat(pid: int) -> tuple[int, float, float, int] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = raw[raw.rfind(b")") + 2:].split()
    # rest[0] is field 3 (state): ppid=4, utime=14, stime=15, cutime=16, cstime=17, starttime=22.
    ppid = int(rest[1])
    own = (int(rest[11]) + int(rest[12])) * 1000.0 / CLK_TCK
    reaped = (int(rest[13]) + int(rest[14])) * 1000.0 / CLK_TCK
    return ppid, own, reaped, int(rest[19])


def cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def label_for(pid: int) -> str:
    """A stable, human name for a process: the Switchyard service, broker, postgres role, or program."""
    argv = cmdline(pid)
    joined = " ".join(argv)
    if not argv:
        return f"pid{pid}"
    if "switchyard.cli" in joined:
        i = argv.index("switchyard.cli") if "switchyard.cli" in argv else -1
        sub = argv[i + 1] if 0 <= i < len(argv) - 1 else "?"
        if sub == "up":
            return "supervisor"
        if sub == "worker" and "--provider" in argv:
            return f"worker-{argv[argv.index('--provider') + 1]}"
        return sub
    if "switchyard" in joined and " up" in joined:
        return "supervisor"
    if argv[0].endswith("tansu") or "tansu" in Path(argv[0]).name or "kafka.Kafka" in argv:
        return "broker"
    if argv[0].startswith("postgres") or argv[0].endswith("/postgres"):
        return "postgres"  # postmaster, backends and background workers alike
    if "litellm" in joined:
        return "litellm"
    return Path(argv[0]).name


def _all_ppids() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _read_stat(int(entry))
            if st is not None:
                out[int(entry)] = st[0]
    return out


def tree(roots: list[int]) -> list[int]:
    """The roots and all their living descendants."""
    parents = _all_ppids()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out: list[int] = []
    stack = [r for r in roots if r in parents]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def snapshot(roots: list[int]) -> dict[tuple[int, int], ProcTimes]:
    """CPU times of the whole tree, keyed by (pid, start time) so a reused pid is not confused."""
    snap: dict[tuple[int, int], ProcTimes] = {}
    for pid in tree(roots):
        st = _read_stat(pid)
        if st is None:
            continue
        ppid, own, reaped, start = st
        snap[(pid, start)] = ProcTimes(pid, ppid, label_for(pid), own, reaped, start)
    return snap


def cpu_delta(before: dict[tuple[int, int], ProcTimes],
              after: dict[tuple[int, int], ProcTimes]) -> dict[str, float]:
    """CPU ms spent between two snapshots, per label (processes of one label summed).

    A process born in between counts whole; a child that died and was reaped in between shows
    up in its parent's `reaped_children_ms` and is counted there (under the parent's label).
    A process that died unreaped in between is lost (rare: our supervisors reap promptly).
    """
    out: dict[str, float] = {}
    for key, a in after.items():
        b = before.get(key)
        own = a.own_ms - (b.own_ms if b else 0.0)
        reaped = a.reaped_children_ms - (b.reaped_children_ms if b else 0.0)
        out[a.label] = out.get(a.label, 0.0) + max(0.0, own) + max(0.0, reaped)
    return out


def memory(roots: list[int]) -> dict[str, dict[str, float]]:
    """Per process: current and peak resident set (MB), keyed `label[pid]`."""
    out: dict[str, dict[str, float]] = {}
    for pid in tree(roots):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)

        def mb(name: str, fields: dict[str, str] = fields) -> float:
            value = fields.get(name, "0 kB").split()
            return round(int(value[0]) / 1024.0, 1) if value else 0.0

        out[f"{label_for(pid)}[{pid}]"] = {"rss_mb": mb("VmRSS"), "peak_rss_mb": mb("VmHWM")}
    return out


def reset_peaks(roots: list[int]) -> None:
    """Start every process's peak resident set (`VmHWM`) over from its current size (Linux `clear_refs` 5),
    so a later `memory` gives the peak of what ran in between. Needs to own the processes (or root)."""
    for pid in tree(roots):
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def machine() -> dict[str, object]:
    """The machine line: cores, load, CPU model, memory."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = 0.0
    with contextlib.suppress(OSError, IndexError, ValueError):
        mem_gb = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024, 1)
    return {"cores": os.cpu_count(), "cpu_model": model, "mem_gb": mem_gb, "loadavg": list(os.getloadavg())}


def _signal_tree(roots: list[int], sig: int) -> None:
    import signal as _signal

    pids = tree(roots)
    if sig == _signal.SIGCONT:
        pids.reverse()  # broker and database (roots' early children) first, then services
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def pause(roots: list[int]) -> None:
    """SIGSTOP a whole target while another is measured, so its idle polling costs the other nothing."""
    import signal as _signal

    _signal_tree(roots, _signal.SIGSTOP)


def resume(roots: list[int]) -> None:
    import signal as _signal

    _signal_tree(roots, _signal.SIGCONT)
