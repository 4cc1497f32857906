"""The fuzz tests run longer than the suite runs them, and their totals.

- `tests/test_api_fuzz.py` (schemathesis over every public route of a live stack, the suite's own session
  stack): `SWITCHYARD_FUZZ_EXAMPLES` generated cases per route (the suite runs 25), each call's status written
  to `SWITCHYARD_FUZZ_TALLY`, so the totals are the calls really made: per route, 5xx answers, and the restarts
  of every supervised process across the run (a crash is a restart).
- `tests/test_adapter_fuzz.py` (hypothesis over every provider adapter, in process): `SWITCHYARD_FUZZ_EXAMPLES`
  examples per test and adapter class (the suite runs 100); examples per target come from hypothesis's own
  statistics (`--hypothesis-show-statistics`). An exception other than `GatewayError` fails the test: in a worker
  it would end the process, so it is reported as a crash.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_TEST_ID = re.compile(r"^(tests/\S+::\S+):\s*$")
_COUNTS = re.compile(r"- (\d+) passing, (\d+) failing, and (\d+) invalid test cases")
_PHASE = re.compile(r"^\s*- during (\w+) phase")


def _pytest(target: str, examples: int, extra_env: dict[str, str], timeout_s: float) -> tuple[int, str, Path, float]:
    junit = Path(tempfile.mkstemp(prefix="abuse-fuzz-", suffix=".xml")[1])
    env = {**os.environ, "SWITCHYARD_FUZZ_EXAMPLES": str(examples), **extra_env}
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target,
                           "--hypothesis-show-statistics", f"--junitxml={junit}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    return proc.returncode, proc.stdout + proc.stderr, junit, time.monotonic() - began


def _junit(path: Path) -> dict[str, Any]:
    """Tests run, failed (with their first message line) and errored, from pytest's JUnit XML."""
    out: dict[str, Any] = {"tests": 0, "failed": [], "errors": 0, "skipped": 0}
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return out
    for case in root.iter("testcase"):
        out["tests"] += 1
        for child in case:
            if child.tag == "failure":
                out["failed"].append(f"{case.get('name')}: {(child.get('message') or '').splitlines()[0][:200]}")
            elif child.tag == "error":
                out["errors"] += 1
            elif child.tag == "skipped":
                out["skipped"] += 1
    path.unlink(missing_ok=True)
    return out


def examples_per_test(output: str) -> dict[str, int]:
    """Examples hypothesis ran per test id (every phase but shrinking), from --hypothesis-show-statistics."""
    counts: dict[str, int] = defaultdict(int)
    current, phase = None, None
    for line in output.splitlines():
        if m := _TEST_ID.match(line):
            current = m.group(1)
        elif m := _PHASE.match(line):
            phase = m.group(1)
        elif (m := _COUNTS.search(line)) and current and phase != "shrink":
            counts[current] += int(m.group(1)) + int(m.group(2))
    return dict(counts)


def _per_target(counts: dict[str, int]) -> dict[str, int]:
    """Examples summed per target: the adapter class (the test's parameter) or the test itself."""
    out: Counter[str] = Counter()
    for test_id, n in counts.items():
        name = test_id.split("::", 1)[1]
        target = name[name.index("[") + 1:-1] if "[" in name else name
        out[target] += n
    return dict(sorted(out.items()))


def api_fuzz(examples: int, timeout_s: float) -> dict[str, Any]:
    tally = Path(tempfile.mkstemp(prefix="abuse-tally-", suffix=".tsv")[1])
    code, output, junit, seconds = _pytest("tests/test_api_fuzz.py", examples,
                                           {"SWITCHYARD_FUZZ_TALLY": str(tally)}, timeout_s)
    per_route: dict[str, Counter[str]] = defaultdict(Counter)
    restarts_before: dict[str, int] = {}
    restarts_after: dict[str, int] = {}
    for line in tally.read_text().splitlines():
        parts = line.split("\t")
        if parts[0] == "#restarts" and len(parts) == 3:
            restarts_before, restarts_after = json.loads(parts[1]), json.loads(parts[2])
        elif len(parts) == 2:
            per_route[parts[0]][parts[1]] += 1
    tally.unlink(missing_ok=True)
    statuses: Counter[str] = Counter()
    for counts in per_route.values():
        statuses.update(counts)
    crashed = sum(max(0, n - restarts_before.get(name, 0)) for name, n in restarts_after.items())
    return {
        "examples_setting": examples, "seconds": round(seconds, 1), "pytest_exit": code, "tests": _junit(junit),
        "routes": len(per_route), "calls": sum(statuses.values()),
        "calls_per_route": {r: sum(c.values()) for r, c in sorted(per_route.items())},
        "status_counts": dict(sorted(statuses.items())),
        "answers_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "processes_restarted": crashed if restarts_after else None,
        "output_tail": output[-1500:] if code else "",
    }


def adapter_fuzz(examples: int, timeout_s: float) -> dict[str, Any]:
    code, output, junit, seconds = _pytest("tests/test_adapter_fuzz.py", examples, {}, timeout_s)
    counts = examples_per_test(output)
    tests = _junit(junit)
    return {
        "examples_setting": examples, "seconds": round(seconds, 1), "pytest_exit": code, "tests": tests,
        "examples": sum(counts.values()), "examples_per_target": _per_target(counts),
        "crashing_exceptions": len(tests["failed"]),
        "output_tail": output[-1500:] if code else "",
    }
