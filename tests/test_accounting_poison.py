"""No usage event or prompt record can stall accounting (issue 11), on the live stack (real Apache Kafka,
PostgreSQL and every service):

- usage events PostgreSQL refuses for good (an integer no column can hold), or that no date can hold, are
  produced straight to `llm.usage` on every partition, next to good ones: the good rows are stored, the
  poison events are in `llm.dead` as `unstorable` (`switchyard dead list --json`) with the database's
  message, an event that does not validate as `unreadable`, and a later request's usage row still appears;
- the contract keeps what is cheap to keep out: a NUL in a string is removed, token counts are clamped;
- the prompt-log writer (`llm.prompts` → `prompt_log`) does the same, and no prompt text reaches the error;
- and no process of the stack restarts.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
from sqlalchemy import text

from switchyard.shared import topics
from switchyard.shared.contracts import MAX_TOKENS, Usage, UsageEvent
from switchyard.shared.db import make_engine
from switchyard.shared.dead import UNREADABLE, UNSTORABLE
from switchyard.shared.kafka import make_consumer, make_producer, start_client, topic_partitions
from switchyard.shared.kafka_delivery import send_and_wait
from switchyard.shared.prompt_log import PromptRecord
from tests import test_delivery_failures
from tests.stack import RunningStack
from tests.test_accounting import _rows
from tests.test_delivery_failures import dead_list, restarts

restarts_before = test_delivery_failures.restarts_before
"""The stack's restart counts before this module's tests (a module fixture): none may restart."""

def dumps(value: Any) -> bytes:
    """JSON as any producer may write it: integers of any size (orjson stops at 64 bits)."""
    return json.dumps(value).encode()


# ---- what the contract keeps out (no broker needed) ---------------------------------------------------


def test_usage_events_carry_no_nul_and_bounded_token_counts() -> None:
    event = UsageEvent.model_validate_json(dumps({
        "event_id": "e\u00001", "request_id": "r", "attempt": 0, "provider": "openai", "deployment": "d",
        "model_group": "g", "provider_model": "gpt\u0000-4o", "metadata": {"te\u0000am": "a\u0000b"},
        "usage": {"prompt_tokens": 10**30, "completion_tokens": -5, "cached_tokens": 3}}))
    assert (event.event_id, event.provider_model, event.metadata) == ("e1", "gpt-4o", {"team": "ab"})
    assert event.usage == Usage(prompt_tokens=MAX_TOKENS, completion_tokens=0, cached_tokens=3)


def test_prompt_records_carry_no_nul() -> None:
    record = PromptRecord(request_id="r", model="m",
                          request={"messages": [{"content": "a\u0000b", "x\u0000": ["\u0000"]}]})
    assert record.request == {"messages": [{"content": "ab", "x": [""]}]}


# ---- the live stack ------------------------------------------------------------------------------------


def usage_event(request_id: str, **fields: Any) -> dict[str, Any]:
    return {"event_id": f"evt-{uuid.uuid4().hex}", "request_id": request_id, "attempt": 0, "provider": "openai",
            "deployment": "gpt-test/0", "model_group": "gpt-test", "provider_model": "gpt-4o-mini",
            "key_id": None, "usage": {"prompt_tokens": 10, "completion_tokens": 5}} | fields


async def produce(bootstrap: str, topic: str, messages: list[tuple[int, bytes, bytes]]) -> None:
    """(partition, key, value) each, in order, acknowledged."""
    producer = make_producer(bootstrap)
    await start_client(producer, "test-poison-producer")
    try:
        for partition, key, value in messages:
            await send_and_wait(producer, topic, value, key=key, partition=partition)
    finally:
        await producer.stop()


async def partition_count(bootstrap: str, topic: str) -> int:
    """How many partitions `topic` has on the stack (SWITCHYARD_PARTITIONS may have capped them)."""
    consumer = make_consumer(bootstrap=bootstrap, group_id=None)
    await start_client(consumer, "test-poison-partitions")
    try:
        return len(await topic_partitions(consumer, topic))
    finally:
        await consumer.stop()


async def stored(database_url: str, sql: str, ids: list[str], want: int,
                 timeout_s: float = 120) -> list[dict[str, Any]]:
    engine = make_engine(database_url, pool_size=1)
    try:
        deadline = time.time() + timeout_s
        while True:
            async with engine.connect() as conn:
                rows = [dict(r) for r in (await conn.execute(text(sql), {"ids": ids})).mappings()]
            if len(rows) >= want or time.time() > deadline:
                return rows
            await asyncio.sleep(0.3)
    finally:
        await engine.dispose()


async def dead_for(stack: RunningStack, ids: set[str], want: int, timeout_s: float = 120) -> list[dict[str, Any]]:
    deadline = time.time() + timeout_s
    while True:
        found = [d for d in await asyncio.to_thread(dead_list, stack) if d["request_id"] in ids]
        if len(found) >= want or time.time() > deadline:
            return found
        await asyncio.sleep(0.5)


async def test_unstorable_usage_events_are_dead_lettered_and_spend_goes_on(
        stack: RunningStack, restarts_before: dict[str, int]) -> None:
    run = uuid.uuid4().hex[:8]
    poison = {  # each PostgreSQL (or a date) can never hold
        "attempt": {"attempt": 2**40}, "call_seq": {"call_seq": -(2**40)}, "status": {"status": 2**33},
        "ts_ms": {"ts_ms": 10**17}}
    messages: list[tuple[int, bytes, bytes]] = []
    good: list[str] = []
    bad: dict[str, str] = {}
    # every partition meets poison before good events
    for partition in range(await partition_count(stack.bootstrap, topics.USAGE)):
        for name, fields in poison.items():
            rid = f"poison-{run}-{partition}-{name}"
            bad[rid] = name
            messages.append((partition, rid.encode(), dumps(usage_event(rid, **fields))))
            rid = f"good-{run}-{partition}-{name}"
            good.append(rid)
            messages.append((partition, rid.encode(), dumps(usage_event(rid))))
    nul, huge = f"good-{run}-nul", f"good-{run}-huge"
    messages.append((0, b"k", dumps(usage_event(nul, provider_model="gpt-4o-mini\u0000",
                                                       metadata={"team": f"t{run}\u0000x"}))))
    messages.append((0, b"k", dumps(usage_event(huge, usage={"prompt_tokens": 10**20}))))
    unreadable = dumps({"event_id": f"evt-{run}", "request_id": f"unreadable-{run}", "attempt": "many"})
    messages.append((0, b"k", unreadable))
    await produce(stack.bootstrap, topics.USAGE, messages)

    rows = await stored(stack.database_url, "SELECT request_id, provider_model, team, prompt_tokens FROM usage "
                        "WHERE request_id = ANY(:ids)", [*good, nul, huge], want=len(good) + 2)
    by_id = {r["request_id"]: r for r in rows}
    assert set(by_id) == {*good, nul, huge}
    assert (by_id[nul]["provider_model"], by_id[nul]["team"]) == ("gpt-4o-mini", f"t{run}x")
    assert by_id[huge]["prompt_tokens"] == MAX_TOKENS

    letters = await dead_for(stack, set(bad), want=len(bad))
    assert {d["request_id"] for d in letters} == set(bad)
    for letter in letters:
        assert (letter["reason"], letter["service"], letter["topic"]) == (UNSTORABLE, "accounting", topics.USAGE)
        assert not letter["replayed"]
        expected = "out of int32 range" if bad[letter["request_id"]] != "ts_ms" else "year"
        assert expected in letter["error"], letter
    assert not await stored(stack.database_url, "SELECT 1 FROM usage WHERE request_id = ANY(:ids)", list(bad),
                            want=1, timeout_s=0)
    [unread] = [d for d in await asyncio.to_thread(dead_list, stack)
                if d["reason"] == UNREADABLE and d["topic"] == topics.USAGE and d["bytes"] == len(unreadable)]
    assert "attempt" in unread["error"] and unread["service"] == "accounting"

    async with httpx.AsyncClient(timeout=60) as client:  # spend still flows, whichever partition it takes
        r = await client.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(), json={
            "model": "gpt-test", "messages": [{"role": "user", "content": "after the poison"}]})
    assert r.status_code == 200
    [row] = await _rows(stack.database_url, r.headers["x-request-id"], wait_s=120)
    assert row["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert restarts(stack) == restarts_before


async def test_unstorable_prompt_records_are_dead_lettered_and_the_log_goes_on(
        stack: RunningStack, restarts_before: dict[str, int]) -> None:
    run = uuid.uuid4().hex[:8]
    secret = f"my secret prompt {run}"

    def record(rid: str, **fields: Any) -> bytes:
        return dumps({"request_id": rid, "logged": True, "model": "gpt-test", "status": 200,
                             "request": {"messages": [{"role": "user", "content": secret}]}} | fields)

    messages: list[tuple[int, bytes, bytes]] = []
    good: list[str] = []
    bad: list[str] = []
    for partition in range(await partition_count(stack.bootstrap, topics.PROMPTS)):
        for name, fields in {"attempts": {"attempts": 2**40}, "ts_ms": {"ts_ms": 10**17}}.items():
            rid = f"poison-prompt-{run}-{partition}-{name}"
            bad.append(rid)
            messages.append((partition, rid.encode(), record(rid, **fields)))
        rid = f"good-prompt-{run}-{partition}"
        good.append(rid)
        messages.append((partition, rid.encode(), record(rid)))
    nul = f"good-prompt-{run}-nul"
    messages.append((0, b"k", record(nul, request={"messages": [{"role": "user", "content": "a\u0000b"}]})))
    await produce(stack.bootstrap, topics.PROMPTS, messages)

    rows = await stored(stack.database_url, "SELECT request_id, request FROM prompt_log WHERE request_id = ANY(:ids)",
                        [*good, nul], want=len(good) + 1)
    by_id = {r["request_id"]: r for r in rows}
    assert set(by_id) == {*good, nul}
    assert by_id[nul]["request"] == {"messages": [{"role": "user", "content": "ab"}]}
    letters = await dead_for(stack, set(bad), want=len(bad))
    assert {d["request_id"] for d in letters} == set(bad)
    for letter in letters:
        assert (letter["reason"], letter["service"], letter["topic"]) == (UNSTORABLE, "accounting", topics.PROMPTS)
        assert secret not in letter["error"] and "my secret" not in letter["error"]
    assert restarts(stack) == restarts_before
