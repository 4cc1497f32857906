"""Secrets and prompts stay where they belong (issue 18).

- A deployment's credentials are resolved only by its provider's worker pool: ingress, the router and
  accounting load them blank, and a variable missing for one provider stops no process from starting.
- `switchyard up` gives each process only the secrets it needs: a provider's variables (the `${VAR}`s of its
  deployments' credentials, and its conventional ones such as OPENAI_API_KEY) reach only that provider's
  workers; ingress, the router and accounting start without them.
- A pydantic validation error never writes the input it refused (a prompt, a key) into a log line.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from pydantic import ValidationError

from switchyard.shared import topics
from switchyard.shared.config import parse_config, secret_variables
from switchyard.shared.contracts import UsageEvent
from switchyard.shared.kafka import make_producer, start_client
from switchyard.shared.kafka_delivery import send_and_wait
from switchyard.shared.logs import JsonFormatter
from switchyard.shared.redaction import RedactingFilter
from switchyard.shared.settings import read_stack
from tests.fakes.anthropic_fake import FakeAnthropic
from tests.fakes.openai_fake import FakeOpenAI
from tests.stack import RunningStack, start_stack, warm_up

# A prompt: no redaction detector recognises it, so only not writing it keeps it out of the logs.
MARKER = "confidential-prompt-zq81vx"
TAIL = MARKER[-6:]  # pydantic shortens a long input in the middle: what is left of it still ends so

CONFIG = """
models:
  - name: gpt
    deployments:
      - {provider: openai, model: gpt-4o-mini, api_base: "OPENAI_URL/v1", api_key: "${SCOPE_OPENAI_KEY}",
         headers: {x-team: "${SCOPE_OPENAI_TEAM}"}}
  - name: claude
    deployments:
      - {provider: anthropic, model: claude-3-5-haiku-20241022, api_base: "ANTHROPIC_URL",
         api_key: "${SCOPE_MISSING_ANTHROPIC_KEY}"}
"""
ENV = {"SCOPE_OPENAI_KEY": "sk-scope-openai-secret", "SCOPE_OPENAI_TEAM": "team-secret"}
CONVENTIONAL = {"OPENAI_API_KEY": "sk-conventional-openai", "ANTHROPIC_API_KEY": "sk-ant-conventional",
                "AWS_SECRET_ACCESS_KEY": "aws-secret-nobody-uses"}
"""Provider keys in the environment `switchyard up` starts from, whether the config names them or not."""


# ---- config: who resolves what ----------------------------------------------------------------------


def test_only_the_providers_worker_resolves_its_credentials() -> None:
    for_others = parse_config(CONFIG, env={})  # ingress, router, accounting: no provider variable is read
    for dep in (d for m in for_others.models for d in m.deployments):
        assert (dep.api_key, dep.api_keys, dep.headers, dep.credentials_missing) == (None, [], {}, None)

    openai_worker = parse_config(CONFIG, env=dict(ENV), secrets_for="openai")
    gpt, claude = (m.deployments[0] for m in openai_worker.models)
    assert (gpt.api_key, gpt.headers) == ("sk-scope-openai-secret", {"x-team": "team-secret"})
    assert claude.api_key is None and claude.credentials_missing is None  # another provider's: not read

    anthropic_worker = parse_config(CONFIG, env=dict(ENV), secrets_for="anthropic")
    gpt, claude = (m.deployments[0] for m in anthropic_worker.models)
    assert gpt.api_key is None and gpt.headers == {}
    assert claude.api_key is None
    assert claude.credentials_missing == ("models[1].deployments[0].api_key: environment variable "
                                          "SCOPE_MISSING_ANTHROPIC_KEY is not set")
    assert "SCOPE" not in repr(claude)


def test_secret_variables_are_the_credentials_variables_of_each_provider() -> None:
    found = secret_variables(CONFIG)
    assert {"SCOPE_OPENAI_KEY", "SCOPE_OPENAI_TEAM", "OPENAI_API_KEY"} <= found["openai"]
    assert {"SCOPE_MISSING_ANTHROPIC_KEY", "ANTHROPIC_API_KEY"} <= found["anthropic"]
    assert "SCOPE_OPENAI_KEY" not in found["anthropic"] and "AWS_SECRET_ACCESS_KEY" in found["bedrock"]
    shared_base = ("models:\n  - name: a\n    deployments:\n      - {provider: azure, model: m, "
                   'api_base: "${AZ_BASE}", api_key: "${AZ_KEY}", headers: {x-base: "${AZ_BASE}"}}\n')
    assert "AZ_KEY" in secret_variables(shared_base)["azure"]
    assert "AZ_BASE" not in secret_variables(shared_base)["azure"], "every process needs an api_base to start"
    assert secret_variables("models: [") == secret_variables(None)  # a broken file is load_config's to report


def test_a_literal_key_in_the_file_is_blank_outside_its_workers() -> None:
    text = "models:\n  - name: a\n    deployments:\n      - {provider: openai, model: m, api_key: sk-literal-1}\n"
    assert parse_config(text, env={}).models[0].deployments[0].api_key is None
    assert parse_config(text, env={}, secrets_for="openai").models[0].deployments[0].api_key == "sk-literal-1"


# ---- logs: validation errors without their input ----------------------------------------------------


def test_a_logged_validation_error_does_not_quote_its_input() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("test"))
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("test.secrets_scope")
    log.addHandler(handler)
    try:
        try:
            UsageEvent.model_validate_json(orjson.dumps({"request_id": MARKER, "model": [MARKER]}))
        except ValidationError:
            log.exception("dropping it")
        try:  # a ValidationError as the cause of another error, as a handler that wraps it would log it
            try:
                UsageEvent.model_validate({"event_id": MARKER})
            except ValidationError as e:
                raise RuntimeError("could not handle a message") from e
        except RuntimeError as e:
            log.error("failed", exc_info=e)
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert "dropping it" in text and "could not handle a message" in text and "validation error" in text
    assert TAIL not in text and "input_value" not in text, text


# ---- live: a stack whose anthropic key is missing -----------------------------------------------------


@pytest.fixture(scope="module")
def scoped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningStack, FakeOpenAI, FakeAnthropic]]:
    openai_fake, anthropic_fake = FakeOpenAI().start(), FakeAnthropic().start()
    config = CONFIG.replace("OPENAI_URL", openai_fake.url).replace("ANTHROPIC_URL", anthropic_fake.url)
    running = start_stack(tmp_path_factory.mktemp("scoped"), config, extra_env={**ENV, **CONVENTIONAL})
    try:
        warm_up(running, "gpt")
        openai_fake.reset()
        yield running, openai_fake, anthropic_fake
    finally:
        code = running.stop()
        openai_fake.stop()
        anthropic_fake.stop()
        assert code == 0, f"switchyard up did not stop cleanly ({code}):\n{running.log()[-3000:]}"


def test_a_missing_key_for_one_provider_stops_nothing(scoped: tuple[RunningStack, FakeOpenAI, FakeAnthropic]) -> None:
    stack, openai_fake, anthropic_fake = scoped
    r = httpx.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(), timeout=60,
                   json={"model": "gpt", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    (sent,) = openai_fake.calls()
    assert sent.headers["authorization"] == "Bearer sk-scope-openai-secret" and sent.headers["x-team"] == "team-secret"

    r = httpx.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(), timeout=60,
                   json={"model": "claude", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_auth_error"
    assert "SCOPE_MISSING" not in r.text, "the caller learns nothing of the gateway's configuration"
    assert anthropic_fake.calls() == [], "no call goes out without the deployment's credentials"
    worker_log = (stack.cwd / ".switchyard" / "logs" / "worker-anthropic-0.log").read_text()
    assert "SCOPE_MISSING_ANTHROPIC_KEY" in worker_log, "the operator's log names the missing variable"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def test_only_a_providers_workers_hold_its_secrets(scoped: tuple[RunningStack, FakeOpenAI, FakeAnthropic]) -> None:
    stack = scoped[0]
    children = read_stack(stack.cwd)["children"]
    envs = {name: _environ(pid) for name, pid in children.items()}
    assert {"ingress-0", "router-0", "accounting-0", "worker-openai-0", "worker-anthropic-0"} <= envs.keys()
    openai_worker = envs["worker-openai-0"]
    assert (openai_worker.get("SCOPE_OPENAI_KEY"), openai_worker.get("SCOPE_OPENAI_TEAM"),
            openai_worker.get("OPENAI_API_KEY")) == ("sk-scope-openai-secret", "team-secret", "sk-conventional-openai")
    assert envs["worker-anthropic-0"].get("ANTHROPIC_API_KEY") == "sk-ant-conventional"
    secrets = {*ENV, *CONVENTIONAL}
    owners = {"worker-openai-0": {*ENV, "OPENAI_API_KEY"}, "worker-anthropic-0": {"ANTHROPIC_API_KEY"}}
    for name, env in envs.items():
        own = owners.get(name, set())
        assert not (secrets - own) & env.keys(), f"{name} holds {sorted((secrets - own) & env.keys())}"
    assert envs["ingress-0"]["SWITCHYARD_MASTER_KEY"] == stack.info["master_key"]  # what it does need, it has


async def _produce_hostile(bootstrap: str) -> None:
    """What a batch producer with Kafka access could write: records that do not validate, carrying a prompt."""
    producer = make_producer(bootstrap)
    await start_client(producer, "test-producer")
    try:
        usage = {"request_id": MARKER, "model": {"prompt": MARKER}, "usage": MARKER}
        await send_and_wait(producer, topics.USAGE, orjson.dumps(usage), key=b"k")
        prompt = {"request_id": "r", "request": {"messages": [{"role": "user", "content": MARKER}]}, "v": "x"}
        await send_and_wait(producer, topics.PROMPTS, orjson.dumps(prompt), key=b"k")
        envelope = {"id": "r-hostile", "model": [MARKER], "body": {"messages": MARKER}}
        await send_and_wait(producer, topics.REQUESTS, orjson.dumps(envelope), key=b"r-hostile")
    finally:
        await producer.stop()


def _logs(stack: RunningStack) -> dict[Path, str]:
    files = [stack.output, *sorted((stack.cwd / ".switchyard" / "logs").glob("*.log"))]
    return {f: f.read_text(errors="replace") for f in files}


def test_refused_bodies_never_reach_a_log(scoped: tuple[RunningStack, FakeOpenAI, FakeAnthropic]) -> None:
    stack = scoped[0]
    for body in ({"model": "gpt", "messages": MARKER}, {"model": "gpt", "messages": [{"role": MARKER}]},
                 {"model": "gpt", "messages": [{"role": "user", "content": "x"}], "temperature": MARKER},
                 {"model": MARKER, "messages": [{"role": "user", "content": MARKER}], "n": [MARKER]}):
        r = httpx.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(), json=body, timeout=60)
        assert r.status_code in (400, 404), r.text
    asyncio.run(_produce_hostile(stack.bootstrap))
    wanted = ("the usage event cannot be read", "the prompt record cannot be read")  # dead-lettered, logged
    deadline = time.monotonic() + 60
    while not all(any(w in text for text in _logs(stack).values()) for w in wanted):
        assert time.monotonic() < deadline, f"accounting never reported the malformed records: {wanted}"
        time.sleep(0.2)
    leaked = [str(f) for f, text in _logs(stack).items() if TAIL in text]
    assert not leaked, f"a refused body's text reached the logs: {leaked}"
