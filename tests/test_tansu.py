"""The Tansu fallback: a machine without Java still gets a working gateway from `switchyard up`.

The whole suite runs on Apache Kafka; this keeps the Java-less path honest with one stack started as a
user without Java would start it (no `--broker`), then a chat, a stream, a batch job and the spend report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from openai import OpenAI

from switchyard.devstack.broker import TANSU_COST
from switchyard.shared.settings import read_stack
from tests.stack import MASTER_KEY, RunningStack, start_stack, warm_up


def _path_without_java(folder: Path) -> str:
    """A PATH whose folders hold everything the current PATH does, except `java`."""
    folder.mkdir(parents=True, exist_ok=True)
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            link = folder / name
            if name != "java" and not link.exists():
                link.symlink_to(Path(directory) / name)
    return str(folder)


@pytest.fixture(scope="module")
def tansu_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    cwd = tmp_path_factory.mktemp("tansu")
    env = {"PATH": _path_without_java(cwd / "bin"), "JAVA_HOME": str(cwd / "no-java")}
    running = start_stack(cwd / "stack", None, extra_env=env, broker=None)
    try:
        warm_up(running, "demo")
        yield running
    finally:
        assert running.stop() == 0, running.log()[-3000:]


def test_up_without_java_falls_back_to_tansu_and_says_what_it_costs(tansu_stack: RunningStack) -> None:
    log = tansu_stack.log()
    assert f"falling back to {TANSU_COST}" in log
    assert "embedded Tansu on" in log and "in-memory, development only" in log
    assert read_stack(tansu_stack.cwd)["broker_kind"] == "tansu"


def test_chat_and_stream_through_the_openai_sdk(tansu_stack: RunningStack) -> None:
    client = OpenAI(base_url=f"{tansu_stack.url}/v1", api_key=MASTER_KEY, max_retries=0)
    answer = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "plain"}])
    assert answer.choices[0].message.content == "Echo: plain"
    stream = client.chat.completions.create(model="demo", stream=True,
                                            messages=[{"role": "user", "content": "streamed words"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Echo: streamed words"


def test_batch_job_and_spend(tansu_stack: RunningStack) -> None:
    lines = [{"custom_id": f"t-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "demo", "messages": [{"role": "user", "content": f"batch {i}"}]}} for i in range(5)]
    (tansu_stack.cwd / "in.jsonl").write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    result = tansu_stack.cli("batch", "run", "in.jsonl", "--out", "out.jsonl")
    assert result.returncode == 0, result.stderr
    out = {o["custom_id"]: o for o in map(orjson.loads, (tansu_stack.cwd / "out.jsonl").read_bytes().splitlines())}
    assert sorted(out) == [f"t-{i}" for i in range(5)]
    assert out["t-3"]["response"]["body"]["choices"][0]["message"]["content"] == "Echo: batch 3"
    # Accounting stores usage asynchronously: poll the spend report until the batch's calls are in it.
    deadline = time.time() + 60
    while True:
        spend = tansu_stack.cli("spend", "--by", "provider", "--since", "1h", "--json")
        assert spend.returncode == 0, spend.stderr
        rows = {row["provider"]: row for row in orjson.loads(spend.stdout)}
        if rows.get("demo", {}).get("requests", 0) >= 5 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert rows["demo"]["requests"] >= 5
