"""Crash safety: SIGKILL services of a multi-process stack under load; nothing accepted is lost or counted twice.

One chaos run (bench/chaos.py, short plan: about 100 s in all) on its own `switchyard up --replicas
ingress=2,router=2,worker=2` in front of a fake OpenAI that counts its calls. While plain and
streamed HTTP requests flow over both ingress ports and a batch job goes through the request
topic, PostgreSQL is stopped for 30 s and one router, one worker, the accounting process and
one ingress replica are SIGKILLed (the supervisor restarts each), and so is the Apache Kafka broker,
under load. Then the broker is killed once more, idle. Each test below checks one promise against the
run's report; the last two check, one at a time, the ledger rules the run relies on (a call stored
"in doubt" before it is made, a repeated call marked).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from switchyard.services.accounting.ledger import to_row, write_batch
from switchyard.shared.contracts import Usage, UsageEvent
from switchyard.shared.pg import Database, Query
from tests.stack import RunningStack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/ holds scripts, not a package
from chaos import Plan, run_chaos, summary  # noqa: E402

# The chaos run happens in the first test's fixture: give it room on a loaded machine (about 100 s when idle).
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    report = run_chaos(Plan(), tmp_path_factory.mktemp("chaos"), say=lambda line: print(line, flush=True))
    print(summary(report))
    yield report


def test_every_kill_was_followed_by_a_restart(chaos: dict[str, Any]) -> None:
    killed = {k["target"] for k in chaos["kills"]}
    assert chaos["http"]["slow"] == 12  # the worker's kill waited until these calls were in flight
    under_load = {"broker"} if chaos["broker_kind"] == "kafka" else set()
    assert killed == {"router-0", "worker-openai-0", "accounting-0", "ingress-1"} | under_load
    assert chaos["broker_restarts"] == len(under_load)
    for kill in chaos["kills"]:
        assert kill["new_pid"] not in (None, kill["old_pid"]), kill
    assert chaos["pg_outages"] and chaos["pg_outages"][0]["stopped_s"] >= 29
    # Each killed process was restarted once, and no other process died on the way (no crash loop, not
    # even for the accounting and ingress processes restarted while PostgreSQL was down).
    assert chaos["restarts"] == {name: int(name in killed) for name in chaos["restarts"]}, chaos["restarts"]


def test_the_broker_killed_under_load_lost_nothing_it_acknowledged(chaos: dict[str, Any]) -> None:
    """Apache Kafka was SIGKILLed mid-run and recovered its log: the other tests' counts cover the requests
    that crossed its death (each answered once, each call with its usage row); here, that it happened."""
    if chaos["broker_kind"] != "kafka":
        pytest.skip("the Tansu fallback loses what it held on a restart, by design")
    kill = next(k for k in chaos["kills"] if k["target"] == "broker")
    assert kill["new_pid"] not in (None, kill["old_pid"])
    assert kill["at_s"] < chaos["load_s"]  # requests were still flowing when it died


def test_an_ingress_replica_restarted_during_the_database_outage_serves_again(chaos: dict[str, Any]) -> None:
    """It starts without PostgreSQL (the master key works), reports ready once it has loaded the virtual
    keys, and answers a key it cannot check yet with a 503 and Retry-After, never a bare 500."""
    outage = chaos["pg_outages"][0]
    ingress = next(k for k in chaos["kills"] if k["target"] == "ingress-1")
    assert outage["down_at_s"] < ingress["at_s"] < outage["up_at_s"]
    assert ingress["ready_s"] is not None, ingress
    assert set(chaos["http"]["retried_statuses"]) <= {"503"}


def test_every_http_request_is_answered_with_its_own_answer(chaos: dict[str, Any]) -> None:
    """Callers of the killed ingress replica saw a connection error and retried; none gave up or got an error.

    Half the requests use a rate-limited virtual key: while PostgreSQL (where replicas reserve their
    share of the limit) is down, they are limited on each replica's own count, not failed.
    """
    http = chaos["http"]
    assert http["sent"] > 100 and http["virtual_key"] > 50
    assert http["lost"] == 0, http["lost_detail"]
    assert http["errors"] == {}, http["error_detail"]
    assert http["answered"] == http["sent"]
    assert http["wrong_answers"] == 0  # every 200 (and every stream, to [DONE]) carries the answer to its question
    assert http["connection_errors"] >= 1  # the ingress kill was felt, and survived by retrying


def test_every_batch_line_has_exactly_one_result(chaos: dict[str, Any]) -> None:
    batch = chaos["batch"]
    assert batch["finished"] and batch["error"] is None
    assert batch["results"] == batch["sent"] == 40
    assert batch["missing"] == 0 and batch["duplicate_results"] == 0
    assert batch["ok"] == batch["sent"]


def test_every_answer_has_one_usage_row_despite_the_database_outage(chaos: dict[str, Any]) -> None:
    """PostgreSQL was down for 30 s and accounting was killed meanwhile: every 200 still has its ok row."""
    assert chaos["answered_without_usage_count"] == 0, (chaos["answered_without_usage"],
                                                        chaos["batch_ok_without_usage"])
    assert chaos["ok_twice_unmarked"] == []


def test_no_usage_row_is_duplicated(chaos: dict[str, Any]) -> None:
    """Extra calls for one request attempt (at-least-once redelivery after a kill) are marked `redelivered`.

    The worker was killed with slow calls in flight, so some calls were surely made twice: each
    second call has its own row, marked; no attempt has two unmarked rows.
    """
    assert chaos["duplicate_usage_rows"] == 0
    assert chaos["redelivered_rows"] >= 1


def test_provider_calls_match_usage_rows(chaos: dict[str, Any]) -> None:
    """A provider call made is a usage row written, including calls whose worker died mid-call.

    Such a call is stored when it starts and completed when it ends; if its worker dies first, the
    row stays "in doubt" (status 0). A worker killed between recording the start and sending the
    request leaves an in-doubt row without a call, so only in-doubt rows may exceed the calls.
    """
    calls, rows, in_doubt = chaos["provider_calls"], chaos["usage_rows"], chaos["in_doubt_rows"]
    assert calls >= chaos["http"]["answered"] + chaos["batch"]["ok"]
    assert in_doubt >= 1  # the worker died with calls in flight (the slow burst made sure of it)
    assert rows - in_doubt <= calls <= rows, summary(chaos)


def test_services_resume_after_the_broker_restarts(chaos: dict[str, Any]) -> None:
    """The embedded broker was SIGKILLed: the supervisor restarted it with its topics, no manual step."""
    restart = chaos["broker_restart"]
    assert restart["new_pid"] not in (None, restart["old_pid"])
    for url, port in restart["ports"].items():
        assert port["first_200_s"] is not None, f"{url} never answered after the broker restart: {restart}"
    assert restart["after_statuses"] == {"200": 10}
    assert restart["batch_finished"] and restart["batch_ok"] == 10
    assert restart["answered_without_usage"] == []  # accounting resumed too
    assert chaos["stack_exit_code"] == 0, chaos["supervisor_log_tail"]


# ---- the ledger rules the chaos run relies on, one at a time, on the shared stack's PostgreSQL ----------


_ROWS_OF = Query("SELECT event_id, status, ok, redelivered, prompt_tokens FROM usage "
                 "WHERE request_id = :rid ORDER BY ts, event_id")


async def _rows_of(database: Database, request_id: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await database.fetch(_ROWS_OF, {"rid": request_id})]


def _call(request_id: str, ts_ms: int) -> UsageEvent:
    """The write-ahead record of one provider call, as a worker publishes it before calling."""
    return UsageEvent(event_id=uuid.uuid4().hex, request_id=request_id, attempt=0, ts_ms=ts_ms, provider="openai",
                      deployment="gpt-test/0", model_group="gpt-test", provider_model="gpt-4o-mini", status=0,
                      ok=False)


def _outcome(started: UsageEvent) -> UsageEvent:
    return started.model_copy(update={"status": 200, "ok": True, "usage": Usage(prompt_tokens=7, completion_tokens=3)})


async def test_a_call_in_doubt_is_completed_by_its_outcome_and_never_regresses(stack: RunningStack) -> None:
    database = Database(stack.database_url, max_size=1)
    try:
        rid = uuid.uuid4().hex
        started = _call(rid, 1_700_000_000_000)
        await write_batch(database, [to_row(started)])
        assert [(r["status"], r["ok"]) for r in await _rows_of(database, rid)] == [(0, False)]  # in doubt
        await write_batch(database, [to_row(_outcome(started))])
        await write_batch(database, [to_row(started)])  # the start record redelivered after the outcome
        rows = await _rows_of(database, rid)
        assert [(r["status"], r["ok"], r["prompt_tokens"]) for r in rows] == [(200, True, 7)]
        other = _call(uuid.uuid4().hex, 1_700_000_000_000)  # start and outcome in one accounting batch
        await write_batch(database, [to_row(other), to_row(_outcome(other)), to_row(other)])
        assert [(r["status"], r["ok"]) for r in await _rows_of(database, other.request_id)] == [(200, True)]
    finally:
        await database.close()


async def test_a_second_call_for_one_attempt_is_marked_redelivered_whatever_the_arrival_order(
        stack: RunningStack) -> None:
    database = Database(stack.database_url, max_size=1)
    try:
        rid = uuid.uuid4().hex
        first, second, third = (_call(rid, 1_700_000_000_000 + i) for i in range(3))
        await write_batch(database, [to_row(_outcome(second))])
        await write_batch(database, [to_row(_outcome(third))])
        await write_batch(database, [to_row(first)])  # the original call, in doubt, stored last
        rows = await _rows_of(database, rid)
        assert [(r["event_id"], r["redelivered"]) for r in rows] == [
            (first.event_id, False), (second.event_id, True), (third.event_id, True)]
    finally:
        await database.close()
