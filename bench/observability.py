"""What Prometheus metrics and OpenTelemetry tracing cost: max throughput and CPU per request, A/B (issue 15).

    .venv/bin/python bench/observability.py                        # ~6 min: bench/run.py --quick, two stacks
    .venv/bin/python bench/observability.py --smoke                # harness check
    .venv/bin/python bench/observability.py --base f094608         # against a revision before issue 15

- `base`: this checkout with Prometheus recording turned into no-ops (bench/metrics_off/sitecustomize.py on its
  PYTHONPATH) and without OTEL_EXPORTER_OTLP_ENDPOINT, so no metric is recorded and no span is recorded or
  exported; with `--base-metrics`, the same checkout with its metrics (tracing alone is compared); or with
  `--base REV` a revision without issue 15's metrics and traces, extracted with `git archive` into
  bench/.work/src/obs-base (the repository itself is not touched);
- `observed`: this checkout, with OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP/HTTP sink started here, so
  every service records and exports spans, and every request is counted in the Prometheus metrics. The sink
  answers 200 to every export and counts them, so the run shows that spans were really exported.

Both stacks run interleaved in one `bench/run.py` run (the other one paused while one is measured), so they
see the same machine load. The target in the issue: observability on costs at most 10 % of max throughput.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE_DIR = ROOT / "bench" / ".work" / "src" / "obs-base"


class Sink:
    """An OTLP/HTTP endpoint that accepts every export (POST /v1/traces) and counts requests and bytes."""

    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        self.bodies: list[bytes] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector serves it: not a new connection per export

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                size = int(self.headers.get("content-length") or 0)
                sink.bodies.append(self.rfile.read(size))
                sink.exports += 1
                sink.bytes += size
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans_by_service(self) -> dict[str, int]:
        """Spans received, by `service.name` (decoded after the run, so the decoding costs the stacks nothing)."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        counts: dict[str, int] = {}
        for body in self.bodies:
            for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "?")
                counts[service] = counts.get(service, 0) + sum(len(s.spans) for s in resource_spans.scope_spans)
        return dict(sorted(counts.items()))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def extract(rev: str) -> Path:
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    if BASE_DIR.exists():
        subprocess.run(["rm", "-rf", str(BASE_DIR)], check=True)
    BASE_DIR.mkdir(parents=True)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(BASE_DIR, filter="data")
    return BASE_DIR


def run_bench(args: argparse.Namespace, name: str, extra: list[str]) -> dict[str, Any]:
    """One `bench/run.py` run of Switchyard (plus the fake direct) with `extra` arguments; its summary."""
    mode = ["--smoke"] if args.smoke else [] if args.full else ["--quick"]
    command = [sys.executable, str(ROOT / "bench" / "run.py"), *mode,
               "--targets", "switchyard", "--no-readme", "--name", name, *extra]
    if args.repeats:
        command += ["--repeats", str(args.repeats)]
    if args.rates and not args.smoke:
        command += ["--rates", args.rates]
    print(" ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    results = sorted((ROOT / "bench" / ("results" if not args.smoke else ".work")).glob(f"*{name}*.json"),
                     key=lambda path: path.stat().st_mtime)  # the newest: names need not sort by time
    return json.loads(results[-1].read_text())["summary"] if results else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None,
                        help="a revision without the observability code "
                             "(default: this checkout, neither metrics nor tracing)")
    parser.add_argument("--base-metrics", action="store_true",
                        help="keep the Prometheus metrics in the base stack: compare tracing alone")
    parser.add_argument("--smoke", action="store_true", help="bench/run.py --smoke instead of --quick")
    parser.add_argument("--full", action="store_true",
                        help="bench/run.py's full scenarios (10 s, not 4 s: steadier CPU figures), not --quick")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rates", default="50,200,500",
                        help="open-loop rates (req/s) at which CPU per request is compared: at a fixed load below "
                             "both stacks' max, the difference is observability's own cost, without the closed "
                             "loop's noise")
    parser.add_argument("--sequential", action="store_true",
                        help="measure base then observed in two runs, one stack at a time, instead of interleaved "
                             "(for when a paused stack does not come back in time)")
    args = parser.parse_args()
    sink = Sink()
    name = "observability-smoke" if args.smoke else "observability"
    otel = [f"OTEL_EXPORTER_OTLP_ENDPOINT={sink.url}", "OTEL_BSP_SCHEDULE_DELAY=1000"]
    if args.base:
        base = ["--repo", str(extract(args.base))]
    elif args.base_metrics:
        base = []
    else:
        base = ["--repo", f"{ROOT}:{ROOT / 'bench' / 'metrics_off'}"]
    if args.sequential:
        summary = {"switchyard": run_bench(args, f"{name}-base", base).get("switchyard", {}),
                   "switchyard-observed": run_bench(args, f"{name}-observed",
                                                    [arg for kv in otel for arg in ("--env", kv)])
                   .get("switchyard", {})}
    else:
        summary = run_bench(args, name, ["--variant", f"observed={ROOT}", *base,
                                         *(arg for kv in otel for arg in ("--variant-env", kv))])
    rows = []
    for target in ("switchyard", "switchyard-observed"):
        s = summary.get(target, {})
        rows.append((target, s.get("max_rps", {}).get("median"), s.get("cpu_ms_per_req_at_max", {}).get("median")))
    print(f"\n{'target':<22}{'max req/s (median)':>20}{'CPU ms/req at max':>20}")
    for target, rps, cpu in rows:
        print(f"{target:<22}{rps!s:>20}{cpu!s:>20}")
    if rows[0][1] and rows[1][1]:
        print(f"\nobserved / base max throughput: {rows[1][1] / rows[0][1]:.1%} (target: >= 90%)")
    off_summary, on_summary = summary.get("switchyard", {}), summary.get("switchyard-observed", {})
    for key in sorted((k for k in off_summary if k.startswith("open")), key=lambda k: float(k[4:])):
        off = off_summary[key].get("cpu_ms_per_req", {}).get("median")
        on = on_summary.get(key, {}).get("cpu_ms_per_req", {}).get("median")
        if off and on:
            print(f"CPU ms per request at {key[4:]} req/s: base {off:.2f}, observed {on:.2f} "
                  f"(observed costs {on / off - 1:+.1%})")
    print(f"OTLP exports received: {sink.exports} ({sink.bytes:,} bytes)")
    spans = sink.spans_by_service()
    print(f"spans received: {sum(spans.values()):,} ({', '.join(f'{k} {v:,}' for k, v in spans.items())})")
    dropped = summary.get("switchyard-observed", {}).get("spans_dropped_by_process", {})
    print(f"spans dropped unsent (switchyard_spans_dropped_total): {dropped or 'not read'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
