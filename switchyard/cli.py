"""The `switchyard` command: run the whole stack, one service, or talk to a running stack."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from switchyard.operate import cmd_dead, cmd_keys, cmd_logs, cmd_spend, cmd_stats


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML config (default: $SWITCHYARD_CONFIG, else ./switchyard.yaml if present)")


def cmd_up(args: argparse.Namespace) -> int:
    from switchyard.devstack.supervisor import up

    return up(args)


def cmd_kafka_install(args: argparse.Namespace) -> int:
    from switchyard.devstack import apache_kafka

    if apache_kafka.installed():
        print(f"Apache Kafka {apache_kafka.KAFKA_VERSION} is installed in {apache_kafka.libs_dir()}")
    else:
        if apache_kafka.java_binary() is None:
            print(f"switchyard: warning: no Java {apache_kafka.MIN_JAVA}+ here; `switchyard up` will fall back to "
                  "Tansu until one is installed", file=sys.stderr)
        print(f"fetching Apache Kafka {apache_kafka.KAFKA_VERSION} from Maven Central...", flush=True)
        try:
            libs = apache_kafka.install()
        except RuntimeError as e:
            print(f"switchyard: {e}", file=sys.stderr)
            return 1
        print(f"Apache Kafka {apache_kafka.KAFKA_VERSION} installed in {libs}")
    if apache_kafka.java_binary() is not None and not apache_kafka.class_archive().is_file():
        print("preparing the broker's class archive (it halves each start's CPU)...", flush=True)
        if not apache_kafka.build_class_archive():
            print("switchyard: warning: no class archive was made; the broker starts without one",
                  file=sys.stderr)
    return 0


def cmd_ui_install(args: argparse.Namespace) -> int:
    from switchyard.shared import ui_assets

    if ui_assets.installed():
        print(f"uPlot {ui_assets.UPLOT_VERSION} is installed in {ui_assets.ui_home()}")
        return 0
    print(f"fetching uPlot {ui_assets.UPLOT_VERSION} (the dashboard's charts) from the npm registry...", flush=True)
    try:
        home = ui_assets.install()
    except RuntimeError as e:
        print(f"switchyard: {e}", file=sys.stderr)
        return 1
    print(f"uPlot {ui_assets.UPLOT_VERSION} installed in {home}")
    return 0


def cmd_ingress(args: argparse.Namespace) -> int:
    from switchyard.services.ingress.main import run

    run(args)
    return 0


def cmd_router(args: argparse.Namespace) -> int:
    from switchyard.services.router.main import run

    run(args)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from switchyard.services.workers.main import run

    run(args)
    return 0


def cmd_accounting(args: argparse.Namespace) -> int:
    from switchyard.services.accounting.main import run

    run(args)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from switchyard.shared.db import upgrade_blocking
    from switchyard.shared.settings import load_settings

    settings = load_settings()
    if not settings.database_url:
        print("switchyard: DATABASE_URL is not set", file=sys.stderr)
        return 2
    upgrade_blocking(settings.database_url)
    print("database migrated to head")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from switchyard.shared import topics
    from switchyard.shared.config import load_config
    from switchyard.shared.kafka import ensure_topics
    from switchyard.shared.settings import load_settings

    try:
        wanted = topics.all_topics(load_config(args.config).providers(), topics.most_partitions())
    except ValueError as e:
        raise SystemExit(str(e)) from None
    created = asyncio.run(ensure_topics(load_settings().bootstrap_servers, wanted, args.replication_factor))
    print(f"{len(created)} topics created, {len(wanted) - len(created)} already existed")
    return 0


def cmd_batch_run(args: argparse.Namespace) -> int:
    from switchyard.batch import run_batch
    from switchyard.shared.settings import load_settings

    counts = asyncio.run(run_batch(Path(args.input), Path(args.out), load_settings().bootstrap_servers,
                                   window_s=args.window))
    print(f"{counts['succeeded']} succeeded, {counts['failed']} failed; results in {args.out}")
    return 0 if counts["failed"] == 0 else 1



def _key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name")
    p.add_argument("--team")
    p.add_argument("--project")
    p.add_argument("--user")
    p.add_argument("--models", help="comma-separated model groups this key may use (default: all)")
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--tpm", type=int, help="tokens per minute")
    p.add_argument("--max-parallel", type=int, dest="max_parallel", help="parallel requests (per ingress replica)")
    p.add_argument("--budget", type=float, help="budget in USD per period")
    p.add_argument("--budget-period", dest="budget_period", choices=["hour", "day", "week", "month"])
    p.add_argument("--expires-in", dest="expires_in", help="e.g. 30d, 12h")
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="free-form tag (repeatable)")
    p.add_argument("--guardrail", action="append", metavar="NAME", help="an extra guardrail of the config (repeatable)")
    p.add_argument("--log-prompts", dest="log_prompts", choices=["on", "off"], help="override prompt logging")
    p.add_argument("--json", action="store_true")


def _health_port_arg(p: argparse.ArgumentParser) -> None:
    default = os.environ.get("SWITCHYARD_HEALTH_PORT")
    p.add_argument("--health-port", type=int, default=int(default) if default else None,
                   help="serve /health, /ready and /metrics on this port (default: $SWITCHYARD_HEALTH_PORT)")


def build_parser() -> argparse.ArgumentParser:
    from switchyard.shared.groupings import GROUPINGS, LATENCY_GROUPINGS, WINDOWS

    parser = argparse.ArgumentParser(prog="switchyard", description="OpenAI-compatible LLM gateway on Kafka")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run the whole gateway here (embedded broker and database unless configured)")
    _config_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--replicas", default=None, help="processes per stage, e.g. ingress=2,router=2,worker=3")
    p.add_argument("--broker", choices=["kafka", "tansu"], default=None,
                   help="embedded broker (default: Apache Kafka where Java 17+ is present, else Tansu); "
                        "KAFKA_BOOTSTRAP_SERVERS wins over both")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("kafka", help="the embedded Apache Kafka broker")
    ksub = p.add_subparsers(dest="kafka_command", required=True)
    k = ksub.add_parser("install", help="fetch the pinned Apache Kafka's jars from Maven Central (once; then a no-op)")
    k.set_defaults(func=cmd_kafka_install)

    p = sub.add_parser("ui", help="the dashboard's assets")
    usub = p.add_subparsers(dest="ui_command", required=True)
    u = usub.add_parser("install", help="fetch the pinned uPlot charting library, integrity-checked (once; then no-op)")
    u.set_defaults(func=cmd_ui_install)

    # The services' own arguments are defined here, not imported from them: building this parser must not
    # import every service (about 3 s of CPU), since each service process starts through it.
    p = sub.add_parser("ingress", help="run one ingress instance (HTTP API)")
    _config_arg(p)
    p.add_argument("--host", default=os.environ.get("SWITCHYARD_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("SWITCHYARD_PORT", "8080")))
    p.add_argument("--reply-partition", default=os.environ.get("SWITCHYARD_REPLY_PARTITION"),
                   help="partition of llm.replies this instance owns (a number, or `ordinal`)")
    p.set_defaults(func=cmd_ingress)

    p = sub.add_parser("router", help="run one router instance")
    _config_arg(p)
    _health_port_arg(p)
    p.set_defaults(func=cmd_router)

    p = sub.add_parser("worker", help="run one worker process for a provider")
    _config_arg(p)
    p.add_argument("--provider", required=True, help="the provider whose topic this pool consumes")
    _health_port_arg(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("accounting", help="run one accounting consumer")
    _config_arg(p)
    _health_port_arg(p)
    p.set_defaults(func=cmd_accounting)

    p = sub.add_parser("migrate", help="apply database migrations (DATABASE_URL)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("topics", help="manage Kafka topics")
    tsub = p.add_subparsers(dest="topics_command", required=True)
    t = tsub.add_parser("create", help="create every topic the config needs (idempotent)")
    _config_arg(t)
    t.add_argument("--replication-factor", type=int, default=int(os.environ.get("KAFKA_REPLICATION_FACTOR", "1")),
                   help="default: $KAFKA_REPLICATION_FACTOR, else 1")
    t.set_defaults(func=cmd_topics)

    p = sub.add_parser("batch", help="batch jobs through Kafka")
    bsub = p.add_subparsers(dest="batch_command", required=True)
    b = bsub.add_parser("run", help="run an OpenAI-format JSONL batch file")
    b.add_argument("input", metavar="IN.jsonl")
    b.add_argument("--out", required=True, metavar="OUT.jsonl")
    b.add_argument("--window", type=float, default=24 * 3600, help="seconds each request may wait (default 24h)")
    b.set_defaults(func=cmd_batch_run)

    p = sub.add_parser("keys", help="virtual keys (through the admin API of the running gateway)")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    k = ksub.add_parser("create", help="create a key (the key is shown once)")
    _key_options(k)
    k.set_defaults(func=cmd_keys)
    k = ksub.add_parser("list", help="list keys")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_keys)
    k = ksub.add_parser("update", help="change a key's owner, limits, budget or expiry")
    k.add_argument("key_id")
    _key_options(k)
    k.set_defaults(func=cmd_keys)
    k = ksub.add_parser("revoke", help="revoke a key (effective on every replica within seconds)")
    k.add_argument("key_id")
    k.set_defaults(func=cmd_keys)

    p = sub.add_parser("dead", help="dead letters: messages that could not be delivered (llm.dead)")
    dsub = p.add_subparsers(dest="dead_command", required=True)
    d = dsub.add_parser("list", help="list dead letters: reason, destination, request id, time")
    d.add_argument("--json", action="store_true", help="print JSON (with the error in words) instead of a table")
    d.add_argument("--limit", type=int, default=100, help="the newest N (default 100)")
    d.set_defaults(func=cmd_dead)
    d = dsub.add_parser("replay", help="send dead letters to their destination again")
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="ids", action="append", metavar="ID", help="a dead letter's id (repeatable)")
    which.add_argument("--all", action="store_true", help="every dead letter not replayed yet")
    d.set_defaults(func=cmd_dead)

    p = sub.add_parser("spend", help="spend from the accounting database")
    p.add_argument("--by", choices=GROUPINGS, default="model")
    p.add_argument("--since", default="30d", help="30m, 24h, 7d, 2w or an ISO date (default 30d)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_spend)

    p = sub.add_parser("logs", help="the prompt log (redacted requests and answers), through the admin API")
    p.add_argument("--request", help="one request's entry, by its x-request-id")
    p.add_argument("--since", help="30m, 1h, 7d or an ISO date")
    p.add_argument("--key-id", dest="key_id")
    p.add_argument("--model")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("stats", help="latency percentiles (total, provider, first token) from the accounting database")
    p.add_argument("--by", choices=list(LATENCY_GROUPINGS), default="deployment")
    p.add_argument("--window", choices=list(WINDOWS), default="1h")
    p.add_argument("--json", action="store_true", help="print JSON (what GET /v1/stats/latency returns in data)")
    p.set_defaults(func=cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
