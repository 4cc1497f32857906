"""Fuzz every public route from the OpenAPI document the live stack serves (schemathesis, issue #11).

What must hold for any request, valid or not: no 5xx (a 504 would mean ingress accepted a request that the
pipeline then dropped, which the short deadline below turns into a failure in seconds), every 4xx in its
route's error shape, no supervised process restarted and no envelope dropped by the router meanwhile.

Every public route is fuzzed, the admin ones with the master key too: in the shared session stack they only
create, update and revoke keys and set team/project budgets under generated names and ids that no other test
uses (a generated key id matches no existing key), and no route stops or reconfigures the gateway. Bodies
sent to a served model reach the session's fake OpenAI provider, which every test that uses it resets first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import ANY

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import BaseSchema, Case, CheckContext, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err, Ok

from switchyard.services.ingress.app import Gateway, create_app
from switchyard.services.ingress.openapi import ANTHROPIC_PATHS, OPENAPI_URL
from switchyard.shared import topics
from switchyard.shared.config_schema import GatewayConfig
from switchyard.shared.settings import Settings, read_stack
from tests.stack import RunningStack

pytestmark = pytest.mark.timeout(300)

EXAMPLES_PER_ROUTE = int(os.environ.get("SWITCHYARD_FUZZ_EXAMPLES", "25"))
"""Generated cases per operation (valid and invalid mixed), derandomized: the same cases on every run.
25 keeps the file under a minute; set SWITCHYARD_FUZZ_EXAMPLES for a longer hunt."""

SERVED_MODELS = ("gpt-test", "claude", "gemini-flash", "command", "azure-gpt", "nova")
"""Put into most generated bodies that name a model (one of the session's models, one per wire format):
a generated name is almost always a 404 at ingress, and the point is that whatever ingress accepts, the
router, every worker pool and its provider handle."""

FUZZ_TALLY = os.environ.get("SWITCHYARD_FUZZ_TALLY")
"""A file to append `route<TAB>status` to for every generated call, and the supervisor's restart counts before and
after (bench/abuse.py reads it for its totals); unset in the suite."""

FUZZ_DEADLINE_S = "10"
"""Sent as x-switchyard-timeout: an accepted request the pipeline never answers becomes a 504 quickly."""


ROUTES = [
    "GET /health", "GET /ready", "GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions",
    "POST /v1/embeddings", "POST /v1/messages", "POST /v1/messages/count_tokens", "GET /v1/keys", "POST /v1/keys",
    "GET /v1/keys/{key_id}", "PATCH /v1/keys/{key_id}", "DELETE /v1/keys/{key_id}", "POST /v1/keys/{key_id}/revoke",
    "PUT /v1/budgets/{scope}/{scope_id}", "GET /v1/spend", "GET /v1/stats/latency",
    "GET /v1/logs", "GET /v1/logs/{request_id}",
    "POST /v1/responses", "GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}",
    "GET /v1/responses/{response_id}/input_items",
    "POST /v1/files", "GET /v1/files", "GET /v1/files/{file_id}", "DELETE /v1/files/{file_id}",
    "GET /v1/files/{file_id}/content", "POST /v1/batches", "GET /v1/batches", "GET /v1/batches/{batch_id}",
    "POST /v1/batches/{batch_id}/cancel",
    "GET /v1/dashboard/overview", "GET /v1/dashboard/spend", "GET /v1/dashboard/providers", "GET /v1/dashboard/keys",
    "GET /v1/dashboard/requests", "GET /v1/dashboard/requests/{request_id}",
]
"""Every public operation: the served document must list exactly these (a new route must be added here)."""


@dataclass
class Before:
    """The stack before fuzzing: restarts per supervised process, and how far the router logs went."""

    restarts: dict[str, int]
    router_logs: dict[Path, int]

    @classmethod
    def of(cls, stack: RunningStack) -> Before:
        return cls(dict(read_stack(stack.cwd)["restarts"]), {p: p.stat().st_size for p in _router_logs(stack)})

    def new_router_log(self, path: Path) -> str:
        with path.open("rb") as f:
            f.seek(self.router_logs.get(path, 0))
            return f.read().decode(errors="replace")


def _router_logs(stack: RunningStack) -> list[Path]:
    return sorted((stack.cwd / ".switchyard" / "logs").glob("router*.log"))


@pytest.fixture(scope="module")
def before(stack: RunningStack) -> Before:
    return Before.of(stack)


@pytest.fixture(scope="module")
def api_schema(stack: RunningStack, before: Before) -> BaseSchema:
    """The document the live stack serves, loaded by schemathesis (which validates it as OpenAPI)."""
    return schemathesis.openapi.from_url(f"{stack.url}{OPENAPI_URL}", timeout=30)


def test_the_served_document_lists_every_public_route_and_how_to_authenticate(stack: RunningStack,
                                                                              api_schema: BaseSchema) -> None:
    served = httpx.get(f"{stack.url}{OPENAPI_URL}", timeout=30)  # public: no key
    assert served.status_code == 200, served.text
    document = served.json()
    operations = list(api_schema.get_all_operations())
    invalid = [str(result.err()) for result in operations if isinstance(result, Err)]
    assert not invalid, invalid
    assert sorted(result.ok().label for result in operations if isinstance(result, Ok)) == sorted(ROUTES)
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": ANY}
    assert document["security"] == [{"bearerAuth": []}]
    for label in ROUTES:
        method, path = label.split()
        operation = document["paths"][path][method.lower()]
        assert ("requestBody" in operation) == (method in ("POST", "PUT", "PATCH") and "revoke" not in path
                                                  and "cancel" not in path), label


def error_shape(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx is JSON in its route's error shape: OpenAI's `{"error": {message, type, param, code}}`,
    or Anthropic's `{"type": "error", "error": {type, message}}` on the /v1/messages routes."""
    if not 400 <= response.status_code < 500:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), body
    if case.operation.path in ANTHROPIC_PATHS:
        assert body["type"] == "error" and isinstance(error.get("type"), str), body
        assert isinstance(error.get("message"), str), body
    else:
        assert set(error) == {"message", "type", "param", "code"}, body
        assert isinstance(error["message"], str) and isinstance(error["type"], str), body
    return True


@pytest.mark.parametrize("label", ROUTES)
def test_no_route_fails_on_any_body(stack: RunningStack, api_schema: BaseSchema, label: str) -> None:
    """Valid and invalid bodies, parameters and headers (schemathesis's positive and negative modes)."""
    method, path = label.split()
    operation = api_schema[path][method]
    cases = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                      operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    headers = {**stack.headers(), topics.HEADER_TIMEOUT: FUZZ_DEADLINE_S}

    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases, model=st.sampled_from((None, *SERVED_MODELS)))
    def fuzz(case: Case, model: str | None) -> None:
        if model and isinstance(case.body, dict) and "model" in case.body:
            case.body = {**case.body, "model": model}
        response = case.call(base_url=stack.url, headers=headers, timeout=30)
        if FUZZ_TALLY:
            with open(FUZZ_TALLY, "a") as tally:
                tally.write(f"{label}\t{response.status_code}\n")
        case.validate_response(response, checks=[not_a_server_error, error_shape])

    fuzz()


@pytest.mark.parametrize(("path", "broken", "anthropic_shape"), [
    ("/v1/chat/completions", "switchyard.services.ingress.plain_routes.validate", False),
    ("/v1/messages/count_tokens", "switchyard.services.ingress.anthropic_api.estimate_tokens", True),
])
def test_an_unexpected_error_is_a_json_500_in_the_route_s_error_shape(monkeypatch: pytest.MonkeyPatch, path: str,
                                                                       broken: str, anthropic_shape: bool) -> None:
    """The safety net behind the fuzzing: a bug that escapes every handler is still a JSON error (no stack)."""
    def bug(*args: object) -> None:
        raise TypeError("a bug")

    monkeypatch.setattr(broken, bug)
    app = create_app(Gateway(Settings(master_key="mk"), GatewayConfig(), reply_partition=0))
    client = TestClient(app, raise_server_exceptions=False)  # not entered: no lifespan, so no Kafka
    r = client.post(path, json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
                    headers={"authorization": "Bearer mk"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    if anthropic_shape:
        assert r.json()["type"] == "error" and error["type"] == "api_error"
    else:
        assert error == {"message": ANY, "type": "api_error", "param": None, "code": "internal_error"}


def test_no_process_restarted_and_no_envelope_was_dropped(stack: RunningStack, before: Before) -> None:
    restarts = read_stack(stack.cwd)["restarts"]
    if FUZZ_TALLY:
        with open(FUZZ_TALLY, "a") as tally:
            tally.write(f"#restarts\t{json.dumps(before.restarts)}\t{json.dumps(restarts)}\n")
    assert restarts and restarts == before.restarts, (before.restarts, restarts)
    dropped = [p.name for p in _router_logs(stack) if "dropping malformed envelope" in before.new_router_log(p)]
    assert not dropped, dropped
