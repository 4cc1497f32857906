"""The Batches API with the official openai SDK: a JSONL file in, lines paced through llm.requests as batch
traffic, results out in OpenAI's batch output shape; bad lines, cancel mid-run and SIGKILLs mid-batch."""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import OpenAI
from openai.types import Batch

from switchyard.shared.settings import read_stack
from tests.stack import RunningStack

pytestmark = pytest.mark.timeout(600)


def client(stack: RunningStack) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=stack.headers()["authorization"].split()[1],
                  max_retries=0, timeout=60)


def chat_line(i: int, model: str = "gpt-test", custom_id: str | None = None) -> dict[str, Any]:
    return {"custom_id": custom_id or f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"item {i}"}]}}


def submit(sdk: OpenAI, lines: list[Any], endpoint: str = "/v1/chat/completions", **extra: Any) -> Batch:
    raw = b"".join((line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines)
    file = sdk.files.create(file=("batch.jsonl", io.BytesIO(raw)), purpose="batch")
    return sdk.batches.create(input_file_id=file.id, endpoint=endpoint,  # type: ignore[arg-type]
                              completion_window="24h", **extra)


def wait_for(sdk: OpenAI, batch_id: str, done: Callable[[Batch], bool], timeout_s: float = 240) -> Batch:
    """Poll the batch as a client would; a connection error (an ingress replica restarting) is retried."""
    deadline = time.time() + timeout_s
    while True:
        try:
            batch = sdk.batches.retrieve(batch_id)
            if done(batch):
                return batch
        except openai.APIConnectionError:
            pass
        assert time.time() < deadline, f"batch {batch_id} did not get there in time"
        time.sleep(0.2)


def finished(batch: Batch) -> bool:
    return batch.status in ("completed", "failed", "cancelled", "expired")


def results(sdk: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(line) for line in sdk.files.content(file_id).read().splitlines()]


def test_a_batch_runs_to_completed_with_one_result_per_custom_id(stack: RunningStack) -> None:
    sdk = client(stack)
    batch = submit(sdk, [chat_line(i) for i in range(20)], metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.object == "batch" and batch.metadata == {"job": "nightly"}
    assert batch.endpoint == "/v1/chat/completions" and (batch.expires_at or 0) > batch.created_at
    batch = wait_for(sdk, batch.id, finished)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (20, 20, 0)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.error_file_id is None
    out = results(sdk, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(20))
    for o in out:
        assert set(o) == {"id", "custom_id", "response", "error"} and o["error"] is None
        assert o["id"].startswith("batch_req_")
        assert o["response"]["status_code"] == 200 and o["response"]["request_id"]
        i = o["custom_id"].removeprefix("req-")
        assert o["response"]["body"]["choices"][0]["message"]["content"] == f"Echo: item {i}"
    output = sdk.files.retrieve(batch.output_file_id)  # type: ignore[arg-type]
    assert output.purpose == "batch_output"


def test_an_embeddings_batch(stack: RunningStack) -> None:
    sdk = client(stack)
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "gpt-test", "input": f"text {i}"}} for i in range(5)]
    batch = wait_for(sdk, submit(sdk, lines, endpoint="/v1/embeddings").id, finished)
    assert batch.status == "completed", batch
    out = results(sdk, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == [f"e{i}" for i in range(5)]
    assert all(o["response"]["body"]["data"][0]["embedding"] for o in out)


def test_a_responses_batch_answers_with_response_objects(stack: RunningStack) -> None:
    sdk = client(stack)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": "gpt-test", "instructions": "Be brief.", "input": f"question {i}",
                       "metadata": {"n": str(i)}}} for i in range(4)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/responses",
                  "body": {"model": "gpt-test", "input": [{"type": "no_such_item"}]}})
    failed = wait_for(sdk, submit(sdk, lines, endpoint="/v1/responses").id, finished)
    assert failed.status == "failed" and failed.errors and failed.errors.data
    assert [e.line for e in failed.errors.data] == [5]

    batch = wait_for(sdk, submit(sdk, lines[:4], endpoint="/v1/responses").id, finished)
    assert batch.status == "completed", batch
    out = sorted(results(sdk, batch.output_file_id), key=lambda o: o["custom_id"])
    assert [o["custom_id"] for o in out] == ["r0", "r1", "r2", "r3"]
    for i, o in enumerate(out):
        body = o["response"]["body"]
        assert body["object"] == "response" and body["id"].startswith("resp_") and body["status"] == "completed"
        assert body["metadata"] == {"n": str(i)}
        message = next(item for item in body["output"] if item["type"] == "message")
        assert message["content"][0]["type"] == "output_text"
        assert message["content"][0]["text"] == f"Echo: question {i}", orjson.dumps(out).decode()
        assert body["usage"]["input_tokens"] > 0 and body["usage"]["total_tokens"] >= body["usage"]["input_tokens"]


def test_lines_that_fail_at_the_provider_go_to_the_error_file(stack: RunningStack, fakes: Any) -> None:
    fakes.main.inject(status=400, message="context length exceeded", times=1)
    sdk = client(stack)
    batch = wait_for(sdk, submit(sdk, [chat_line(i) for i in range(3)]).id, finished)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
    errors = results(sdk, batch.error_file_id)
    assert len(errors) == 1 and errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["message"]
    assert len(results(sdk, batch.output_file_id)) == 2


def test_bad_lines_fail_the_batch_with_their_line_numbers(stack: RunningStack) -> None:
    sdk = client(stack)
    lines: list[Any] = [
        chat_line(1),
        b"{not json",
        chat_line(3, custom_id="req-1"),                                   # a custom_id seen on line 1
        {**chat_line(4), "url": "/v1/embeddings"},                        # not the batch's endpoint
        chat_line(5, model="no-such-model"),
        {**chat_line(6), "body": {"model": "gpt-test", "messages": []}},  # what /v1/chat/completions refuses
        chat_line(7),
    ]
    batch = wait_for(sdk, submit(sdk, lines).id, finished)
    assert batch.status == "failed" and batch.failed_at
    assert batch.errors is not None and batch.errors.data is not None
    by_line = {e.line: e.code for e in batch.errors.data}
    assert by_line == {2: "invalid_json", 3: "duplicate_custom_id", 4: "mismatched_endpoint",
                       5: "model_not_found", 6: "invalid_body"}
    assert all(e.message for e in batch.errors.data)
    assert batch.output_file_id is None


def test_create_refuses_bad_requests_with_openai_errors(stack: RunningStack) -> None:
    sdk = client(stack)
    with pytest.raises(openai.NotFoundError):
        sdk.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h")
    file = sdk.files.create(file=("b.jsonl", io.BytesIO(orjson.dumps(chat_line(0)))), purpose="batch")
    for body, param in (({"endpoint": "/v1/images"}, "endpoint"), ({"completion_window": "forever"},
                                                                  "completion_window")):
        r = httpx.post(f"{stack.url}/v1/batches", headers=stack.headers(), json={
            "input_file_id": file.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    with pytest.raises(openai.NotFoundError):
        sdk.batches.retrieve("batch_missing")


def test_list_batches_with_after_and_limit(stack: RunningStack) -> None:
    sdk = client(stack)
    ids = [submit(sdk, [chat_line(i)]).id for i in range(3)]
    page = sdk.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    page = sdk.batches.list(limit=2, after=ids[1])
    assert page.data[0].id == ids[0]
    for batch_id in ids:
        wait_for(sdk, batch_id, finished)


def test_cancel_mid_run_keeps_the_partial_results(stack: RunningStack) -> None:
    """On the deployment paced to 600 RPM, 300 lines take 30 s: cancel after a few answers."""
    sdk = client(stack)
    batch = submit(sdk, [chat_line(i, model="paced") for i in range(300)])
    wait_for(sdk, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 5)
    cancelling = sdk.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    batch = wait_for(sdk, batch.id, finished)
    assert batch.status == "cancelled" and batch.cancelled_at
    assert batch.request_counts is not None
    done = batch.request_counts.completed
    assert 5 <= done < 300 and batch.request_counts.failed == 0
    out = results(sdk, batch.output_file_id)
    unanswered = results(sdk, batch.error_file_id)
    assert len(out) == done and all(o["response"]["status_code"] == 200 for o in out)
    assert all(e["error"]["code"] == "batch_cancelled" and e["response"] is None for e in unanswered)
    assert sorted(o["custom_id"] for o in out + unanswered) == sorted(f"req-{i}" for i in range(300))
    with pytest.raises(openai.ConflictError):
        sdk.batches.cancel(wait_for(sdk, submit(sdk, [chat_line(0)]).id, finished).id)


def test_a_batch_past_its_window_expires_and_unfinished_lines_get_batch_expired(stack: RunningStack) -> None:
    """The deployment paced to 600 RPM takes at most 600 calls in any minute: with a 3 s window, 650 lines
    cannot all be answered, whatever the machine's speed."""
    sdk = client(stack)
    total = 650
    raw = b"".join(orjson.dumps(chat_line(i, model="paced")) + b"\n" for i in range(total))
    file = sdk.files.create(file=("expiring.jsonl", io.BytesIO(raw)), purpose="batch")
    batch = sdk.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                               completion_window="3s")  # type: ignore[arg-type]
    batch = wait_for(sdk, batch.id, finished)
    assert batch.status == "expired" and batch.expired_at, batch
    out, errors = results(sdk, batch.output_file_id), results(sdk, batch.error_file_id)
    expired = [e for e in errors if e["error"] and e["error"]["code"] == "batch_expired"]
    assert expired and all(e["response"] is None and e["error"]["message"] for e in expired)
    assert sorted(o["custom_id"] for o in out + errors) == sorted(f"req-{i}" for i in range(total))


def _kill(stack: RunningStack, name: str) -> None:
    pid = read_stack(stack.cwd)["children"][name]
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 60
    while read_stack(stack.cwd)["children"].get(name) in (None, pid):  # the supervisor restarts it
        assert time.time() < deadline, f"{name} was not restarted"
        time.sleep(0.2)


def test_a_batch_survives_sigkill_of_a_worker_and_of_the_ingress_that_accepted_it(stack: RunningStack) -> None:
    """Each custom_id is answered exactly once, though the worker died with calls in flight and the ingress
    replica driving the batch died mid-run (it takes its batch back from PostgreSQL when it restarts)."""
    sdk = client(stack)
    total = 150
    batch = submit(sdk, [chat_line(i, model="paced") for i in range(total)])
    wait_for(sdk, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 20)
    _kill(stack, "worker-openai-0")
    wait_for(sdk, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 60)
    _kill(stack, "ingress-0")
    batch = wait_for(sdk, batch.id, finished, timeout_s=400)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (total, 0)
    out = results(sdk, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(total))
    for o in out:
        i = o["custom_id"].removeprefix("req-")
        assert o["response"]["body"]["choices"][0]["message"]["content"] == f"Echo: item {i}"
