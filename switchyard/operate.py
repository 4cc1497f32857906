"""The commands that look into and operate a running stack: `switchyard keys`, `logs`, `spend`, `stats`, `dead`.

`keys` and `logs` go through the ingress admin API with the master key (the stack started here, or SWITCHYARD_URL
and SWITCHYARD_MASTER_KEY); `spend` and `stats` query the accounting database (DATABASE_URL); `dead` reads and
replays `llm.dead` on the broker. Each prints a table, or JSON with `--json`, and exits non-zero when it could
not do what was asked (no database, an admin API error, a replay that failed).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from switchyard.shared.pg import Database


def cmd_dead(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from switchyard.shared.dead import read_dead, replay
    from switchyard.shared.settings import load_settings

    bootstrap = load_settings().bootstrap_servers
    if args.dead_command == "list":
        letters = asyncio.run(read_dead(bootstrap))[-args.limit:] if args.limit > 0 else []
        if args.json:
            print(orjson.dumps([d.summary() for d in letters], option=orjson.OPT_INDENT_2).decode())
            return 0
        cols = ["id", "time", "reason", "destination", "request_id", "service", "replayed"]
        rows = [[d.id, datetime.fromtimestamp(d.ts_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S"), d.reason,
                 d.topic if d.partition is None else f"{d.topic}[{d.partition}]", d.request_id or "-", d.service,
                 "yes" if d.replayed else "no"] for d in letters]
        print_table(cols, rows)
        print(f"{len(letters)} dead letters, {sum(not d.replayed for d in letters)} not replayed")
        return 0
    results = asyncio.run(replay(bootstrap, None if args.all else args.ids))
    for r in results:
        where = r.topic if r.partition is None else f"{r.topic}[{r.partition}]"
        print(f"{r.id}  {'replayed to ' + where if r.error is None else 'FAILED: ' + r.error}")
    failed = sum(r.error is not None for r in results)
    print(f"{len(results) - failed} replayed, {failed} failed")
    return 1 if failed else 0


def _print_table(rows: list[dict[str, Any]], by: str) -> None:
    cols = [by, "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd", "errors", "in_doubt",
            "cache_hits", "saved_usd"]
    cells = [[str(r.get(c) if r.get(c) is not None else "-") if c not in ("cost_usd", "saved_usd")
              else f"{r.get(c) or 0:.6f}" for c in cols]
             for r in rows]
    print_table(cols, cells)
    total = sum(r["cost_usd"] for r in rows)
    hits, saved = sum(r.get("cache_hits", 0) for r in rows), sum(r.get("saved_usd", 0) for r in rows)
    print(f"total  ${total:.6f}  over {sum(r['requests'] for r in rows)} requests  "
          f"(cache: {hits} hits saved ${saved:.6f})")


def _query_database(query: Callable[[Database], Awaitable[list[dict[str, Any]]]]) -> list[dict[str, Any]] | None:
    """Run `query(database)` on a one-connection pool to DATABASE_URL; None (said on stderr) without one."""
    from switchyard.shared.pg import Database
    from switchyard.shared.settings import load_settings

    database_url = load_settings().database_url
    if not database_url:
        print("switchyard: no database: start `switchyard up` here or set DATABASE_URL", file=sys.stderr)
        return None

    async def run() -> list[dict[str, Any]]:
        database = Database(database_url, max_size=1)
        try:
            return await query(database)
        finally:
            await database.close()

    return asyncio.run(run())


def cmd_spend(args: argparse.Namespace) -> int:
    from switchyard.shared.spend import spend

    try:
        rows = _query_database(lambda database: spend(database, by=args.by, since=args.since))
    except ValueError as e:
        print(f"switchyard: {e}", file=sys.stderr)
        return 2
    if rows is None:
        return 2
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    else:
        _print_table(rows, args.by)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from switchyard.shared.stats import TIMINGS, latency

    rows = _query_database(lambda database: latency(database, by=args.by, window=args.window))
    if rows is None:
        return 2
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    cols = [args.by, "requests", "errors", "error_rate"] + [f"{t[:-3]}_{p}" for t in TIMINGS for p in ("p50", "p95",
                                                                                                           "p99")]
    cells = [[str(r[args.by]), str(r["requests"]), str(r["errors"]), f"{r['error_rate']:.1%}"]
             + ["-" if r[t][p] is None else f"{r[t][p]:.0f}" for t in TIMINGS for p in ("p50", "p95", "p99")]
             for r in rows]
    print_table(cols, cells)
    print(f"milliseconds, last {args.window}; percentiles over successful calls")
    return 0


def _admin(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call the ingress admin API of the stack here (or SWITCHYARD_URL) with the master key."""
    import httpx

    from switchyard.shared.settings import load_settings

    settings = load_settings()
    if not settings.master_key:
        raise SystemExit("switchyard: no master key: start `switchyard up` here or set SWITCHYARD_MASTER_KEY")
    try:
        r = httpx.request(method, f"{settings.ingress_url}{path}", json=body, timeout=30,
                          headers={"authorization": f"Bearer {settings.master_key}"})
    except httpx.HTTPError as e:
        raise SystemExit(f"switchyard: cannot reach {settings.ingress_url}: {e}") from None
    data = r.json()
    if r.status_code >= 400:
        raise SystemExit(f"switchyard: {r.status_code}: {data.get('error', {}).get('message', data)}")
    return data


def _key_spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for name in ("name", "team", "project", "user", "rpm", "tpm", "max_parallel", "budget_period", "expires_in"):
        value = getattr(args, name, None)
        if value is not None:
            spec[name] = value
    if args.budget is not None:
        spec["budget_usd"] = args.budget
    if args.models is not None:
        spec["models"] = [m for m in args.models.split(",") if m]
    if args.metadata:
        spec["metadata"] = dict(item.split("=", 1) for item in args.metadata)
    if args.guardrail:
        spec["guardrails"] = args.guardrail
    if args.log_prompts is not None:
        spec["log_prompts"] = args.log_prompts == "on"
    return spec


def cmd_keys(args: argparse.Namespace) -> int:
    if args.keys_command == "create":
        data = _admin("POST", "/v1/keys", _key_spec(args))
        if args.json:
            print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        else:
            print(f"key_id  {data['key_id']}")
            print(f"key     {data['key']}   (shown once: store it now)")
        return 0
    if args.keys_command == "update":
        data = _admin("PATCH", f"/v1/keys/{args.key_id}", _key_spec(args))
    elif args.keys_command == "revoke":
        data = _admin("POST", f"/v1/keys/{args.key_id}/revoke")
    else:
        data = _admin("GET", "/v1/keys")["data"]
        if not args.json:
            cols = ["key_id", "key_prefix", "status", "team", "project", "user_id", "rpm", "tpm", "budget_usd"]
            print("  ".join(cols))
            for row in data:
                print("  ".join(str(row.get(c) if row.get(c) is not None else "-") for c in cols))
            return 0
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """`switchyard logs [--request ID] [--since 1h]`: one entry, or the newest first, as JSON."""
    from urllib.parse import quote, urlencode

    if args.request:
        data = _admin("GET", f"/v1/logs/{quote(args.request, safe='')}")
    else:
        query = {k: v for k, v in (("since", args.since), ("key_id", args.key_id), ("model", args.model),
                                   ("limit", args.limit)) if v is not None}
        data = _admin("GET", f"/v1/logs?{urlencode(query)}")["data"]
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    return 0


def print_table(cols: list[str], rows: list[list[str]]) -> None:
    """Rows under their column names, each column as wide as its widest cell."""
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
