"""Session fixtures: fake providers (real HTTP servers) and one real `switchyard up` stack serving them."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from switchyard.shared import topics
from tests.fakes.anthropic_fake import FakeAnthropic
from tests.fakes.azure_fake import FakeAzureOpenAI
from tests.fakes.bedrock_fake import FakeBedrock
from tests.fakes.cohere_fake import FakeCohere
from tests.fakes.gemini_fake import FakeGemini
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import FakeProvider
from tests.stack import RunningStack, start_stack, warm_up


def pytest_configure(config: pytest.Config) -> None:
    """Each checkout keeps its temporary folders under a root of its own.

    The embedded PostgreSQL runs as the `postgres` user and must traverse every parent of its data folder;
    pytest makes `pytest-of-<user>` private (0700) at every session start, so a second pytest session
    sharing /tmp's root (another checkout's suite) would lock out this session's PostgreSQL mid-run.
    """
    digest = hashlib.sha1(str(Path(__file__).resolve().parent).encode()).hexdigest()[:8]
    root = Path(tempfile.gettempdir()) / f"sy-{digest}"  # short: PostgreSQL socket paths stop at 107 bytes
    root.mkdir(mode=0o711, exist_ok=True)
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", str(root))


LONGEST_FIRST = ("test_chaos.py", "test_pacing.py", "test_abuse.py", "test_tansu_soak.py", "test_delivery_failures.py",
                 "test_guardrails_errors_batches.py", "test_routing_e2e.py", "test_tracing.py", "test_cache.py",
                 "test_up.py", "test_secrets_scope.py", "test_tansu.py", "test_guardrails.py")
"""The files that take longest (each starts a stack of its own or waits on a provider's minute), run first: with
two files at a time, a long file started last would leave one worker idle while the other finishes it. The
other files keep their order (`--no-loadscope-reorder` in pyproject keeps xdist from sorting by test count)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


class Fakes:
    def __init__(self) -> None:
        self.main = FakeOpenAI().start()
        self.faulty = FakeOpenAI().start()
        self.slow = FakeOpenAI().start()
        self.primary = FakeOpenAI().start()
        self.secondary = FakeOpenAI().start()
        self.limited = FakeOpenAI(rpm_limit=600).start()
        self.rotated = FakeOpenAI(rpm_limit=30).start()
        self.anthropic = FakeAnthropic().start()
        self.gemini = FakeGemini().start()
        self.cohere = FakeCohere().start()
        self.azure = FakeAzureOpenAI().start()
        self.bedrock = FakeBedrock().start()

    def all(self) -> list[FakeProvider]:
        return [self.main, self.faulty, self.slow, self.primary, self.secondary, self.limited, self.rotated,
                self.anthropic, self.gemini, self.cohere, self.azure, self.bedrock]

    def stop(self) -> None:
        for fake in self.all():
            fake.stop()


@pytest.fixture(scope="session")
def fakes() -> Iterator[Fakes]:
    f = Fakes()
    yield f
    f.stop()


def stack_config(f: Fakes) -> str:
    return f"""
models:
  - name: gpt-test
    deployments:
      - provider: openai
        model: gpt-4o-mini
        api_base: {f.main.url}/v1
        api_key: ${{TEST_UPSTREAM_KEY}}
  - name: faulty
    deployments:
      - provider: openai
        model: gpt-4o-mini
        api_base: {f.faulty.url}/v1
        api_key: sk-faulty
        first_byte_timeout_s: 2
  - name: slow
    deployments:
      - provider: openai
        model: gpt-4o-mini
        api_base: {f.slow.url}/v1
        api_key: sk-slow
        first_byte_timeout_s: 2
  - name: failover
    deployments:
      - provider: openai
        model: gpt-4o-mini
        api_base: {f.primary.url}/v1
        api_key: sk-primary
      - provider: openai
        model: gpt-4o-mini
        api_base: {f.secondary.url}/v1
        api_key: sk-secondary
  - name: paced
    deployments:
      - provider: openai
        model: gpt-4o-mini
        api_base: {f.limited.url}/v1
        api_key: sk-paced
        rpm: 600
  - name: rotated
    deployments:
      - provider: openai
        model: gpt-4o-mini
        api_base: {f.rotated.url}/v1
        api_keys: [sk-rot-a, sk-rot-b]
        rpm: 30
  - name: claude
    deployments:
      - {{provider: anthropic, model: claude-3-5-haiku-20241022, api_base: "{f.anthropic.url}", api_key: sk-ant}}
  - name: claude-failover
    deployments:
      - {{provider: anthropic, model: claude-3-5-haiku-20241022, api_base: "{f.anthropic.url}", api_key: sk-ant}}
      - {{provider: openai, model: gpt-4o-mini, api_base: "{f.secondary.url}/v1", api_key: sk-secondary}}
  - name: gemini-flash
    deployments:
      - {{provider: gemini, model: gemini-2.0-flash, api_base: "{f.gemini.url}", api_key: goog-key}}
  - name: command
    deployments:
      - {{provider: cohere, model: command-a-03-2025, api_base: "{f.cohere.url}", api_key: co-key}}
  - name: azure-gpt
    deployments:
      - {{provider: azure, model: gpt-4o-mini, api_base: "{f.azure.url}", api_key: az-key, api_version: 2024-10-21}}
  - name: nova
    deployments:
      - {{provider: bedrock, model: amazon.nova-lite-v1:0, api_base: "{f.bedrock.url}", region: us-west-2,
          aws_access_key_id: AKIDFAKE, aws_secret_access_key: fake-secret/key+value}}
"""


@pytest.fixture(scope="session")
def stack(fakes: Fakes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    cwd: Path = tmp_path_factory.mktemp("stack")
    # Sixteen partitions, not one per stage: tests start more ingress replicas (reply partitions 1 and 8 up)
    # and workers on this stack.
    running = start_stack(cwd, stack_config(fakes), extra_env={"TEST_UPSTREAM_KEY": "sk-upstream-secret",
                                                               topics.PARTITIONS_ENV: "16"})
    try:
        warm_up(running, "gpt-test")
        for fake in fakes.all():
            fake.reset()
        yield running
    finally:
        code = running.stop()
        assert code == 0, f"switchyard up did not stop cleanly ({code}):\n{running.log()[-3000:]}"


@pytest.fixture(autouse=True)
def _reset_fakes(request: pytest.FixtureRequest) -> None:
    if "fakes" in request.fixturenames:
        for fake in request.getfixturevalue("fakes").all():
            fake.reset()
