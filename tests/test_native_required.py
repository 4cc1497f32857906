"""A `/v1/messages` request OpenAI's format cannot express (Anthropic's own tools, server-tool result blocks) is
served only as written, by an Anthropic deployment: what ingress records, how the router routes it, what a
worker does when it cannot send it, and the envelope version that keeps older routers from serving it lossy."""

from __future__ import annotations

import random
from typing import Any

import pytest

from switchyard.services.ingress.anthropic_api import (
    NATIVE_MAX_BYTES,
    Lossy,
    estimate_tokens,
    native_request,
    to_openai_request,
)
from switchyard.services.ingress.anthropic_messages import Untranslatable
from switchyard.services.workers.providers import ADAPTERS, get_adapter
from switchyard.services.workers.providers import native as worker_native
from switchyard.shared.breaker import HealthBook
from switchyard.shared.config import parse_config
from switchyard.shared.contracts import CONTRACT_VERSION, ENVELOPE_VERSION, RequestEnvelope, now_ms
from switchyard.shared.errors import GatewayError
from switchyard.shared.native import NATIVE_FORMATS, NATIVE_REQUIRED
from switchyard.shared.routing import decide

WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
BASH = {"type": "bash_20250124", "name": "bash"}
CUSTOM = {"name": "lookup", "input_schema": {"type": "object"}}
SERVER_TURN = [
    {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "kafka"}},
    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
     "content": [{"type": "web_search_result", "url": "https://kafka.apache.org", "title": "Kafka",
                  "encrypted_content": "abc"}]},
    {"type": "text", "text": "Kafka is a log."},
]


def body(**over: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **over}


def test_anthropics_own_tools_and_blocks_are_left_out_and_recorded_in_order() -> None:
    lossy: Lossy = []
    request = body(tools=[CUSTOM, WEB_SEARCH, BASH], tool_choice={"type": "tool", "name": "web_search"}, messages=[
        {"role": "user", "content": [{"type": "text", "text": "what is kafka?"},
                                     {"type": "search_result", "source": "s", "title": "t", "content": []}]},
        {"role": "assistant", "content": SERVER_TURN},
        {"role": "user", "content": "thanks"},
    ])
    out = to_openai_request(request, lossy)
    assert [e.param for e in lossy] == ["messages[0].content[1].type", "messages[1].content[0].type",
                                        "messages[1].content[1].type", "tools[1].type", "tools[2].type"]
    assert [t["function"]["name"] for t in out["tools"]] == ["lookup"]  # the custom tool stays translated
    assert out["messages"][1] == {"role": "assistant", "content": "Kafka is a log."}
    native = native_request(request, {}, lossy)
    assert native is not None and native.body == request
    assert native.lossy is not None and native.lossy.param == "messages[0].content[1].type"
    # Without a list to record it in (or on the OpenAI routes), it is a 400 naming the parameter.
    with pytest.raises(GatewayError) as refused:
        to_openai_request(body(tools=[WEB_SEARCH]))
    assert refused.value.status == 400 and refused.value.param == "tools[0].type"


def test_only_server_tools_leave_nothing_to_choose_from_and_that_is_no_error() -> None:
    lossy: Lossy = []
    out = to_openai_request(body(tools=[WEB_SEARCH], tool_choice={"type": "any"}), lossy)
    assert "tools" not in out and "tool_choice" not in out and len(lossy) == 1


@pytest.mark.parametrize(("tools", "param"), [([{"type": 5, "name": "x"}], "tools[0].type"),
                                              ([{"type": "", "name": "x"}], "tools[0].type")])
def test_a_tool_type_that_is_not_a_name_is_still_invalid(tools: list[Any], param: str) -> None:
    with pytest.raises(GatewayError) as refused:
        to_openai_request(body(tools=tools), [])
    assert refused.value.param == param and not isinstance(refused.value, Untranslatable)


def test_a_lossy_request_too_large_to_pass_through_is_a_400_not_a_lossy_translation() -> None:
    lossy: Lossy = []
    big = body(tools=[WEB_SEARCH], messages=[{"role": "user", "content": "x" * (NATIVE_MAX_BYTES + 1)}])
    to_openai_request(big, lossy)
    with pytest.raises(GatewayError) as refused:
        native_request(big, {}, lossy)
    assert refused.value.status == 400 and refused.value.param == "tools[0].type"
    assert refused.value.code == NATIVE_REQUIRED and "4 MiB" in refused.value.message
    assert native_request({**big, "tools": []}, {}, []) is None  # without server tools it is served translated


def test_mcp_servers_are_anthropics_own_connector() -> None:
    lossy: Lossy = []
    mcp = [{"type": "url", "url": "https://mcp.example.com/sse", "name": "example"}]
    to_openai_request(body(mcp_servers=mcp), lossy)
    assert [e.param for e in lossy] == ["mcp_servers"]
    to_openai_request(body(mcp_servers=[]), [])  # none named: nothing lost


def test_count_tokens_estimates_a_request_with_server_tools() -> None:
    assert estimate_tokens(body(tools=[WEB_SEARCH]))["input_tokens"] >= 1


CONFIG = parse_config("""
models:
  - name: mixed
    fallbacks: [gpt]
    deployments:
      - {provider: openai, model: gpt-4o-mini, api_key: a}
      - {provider: anthropic, model: claude-x, api_key: b}
  - name: gpt
    deployments:
      - {provider: openai, model: gpt-4o-mini, api_key: c}
""", env={})


def envelope(model: str, lossy: bool = True) -> RequestEnvelope:
    request = body(model=model, tools=[WEB_SEARCH] if lossy else [CUSTOM])
    found: Lossy = []
    translated = to_openai_request(request, found)
    return RequestEnvelope(id="r", model=model, body=translated, reply_topic="t",
                           native=native_request(request, {}, found), deadline_ms=now_ms() + 60_000)


def test_the_router_sends_a_lossy_request_only_to_deployments_of_its_format() -> None:
    env = envelope("mixed")
    picked = {decide(env, CONFIG, HealthBook(), now_ms(), random.Random(seed)).deployment.id for seed in range(20)}
    assert picked == {"mixed/1"}
    plain = envelope("mixed", lossy=False)
    assert decide(plain, CONFIG, HealthBook(), now_ms(), random.Random(1)).deployment.id == "mixed/0"  # the first


def test_the_router_answers_a_400_naming_the_param_when_no_deployment_can_pass_it_through() -> None:
    with pytest.raises(GatewayError) as refused:
        decide(envelope("gpt"), CONFIG, HealthBook(), now_ms(), random.Random(1))
    err = refused.value
    assert err.status == 400 and err.type == "invalid_request_error" and err.param == "tools[0].type"
    assert err.code == NATIVE_REQUIRED and "web_search_20250305" in err.message and "'gpt' has none" in err.message


def test_a_worker_that_cannot_send_it_as_written_refuses_it() -> None:
    env = envelope("mixed")
    assert worker_native.native_request(env, get_adapter("anthropic"), guarded=False) is env.native
    for adapter, guarded in ((get_adapter("openai"), False), (get_adapter("anthropic"), True)):
        with pytest.raises(GatewayError) as refused:
            worker_native.native_request(env, adapter, guarded=guarded)
        assert refused.value.status == 400 and refused.value.param == "tools[0].type"
    plain = envelope("mixed", lossy=False)
    assert worker_native.native_request(plain, get_adapter("openai"), guarded=False) is None  # served translated


def test_a_lossy_envelope_is_version_2_and_every_other_stays_readable_by_older_routers() -> None:
    lossy, plain = envelope("mixed"), envelope("mixed", lossy=False)
    assert lossy.v == ENVELOPE_VERSION == 2 and plain.v == CONTRACT_VERSION == 1
    assert RequestEnvelope.model_validate_json(lossy.model_dump_json()).native == lossy.native


def test_the_routers_format_table_agrees_with_the_adapters() -> None:
    assert {name: get_adapter(name).native_format for name in ADAPTERS
            if get_adapter(name).native_format} == NATIVE_FORMATS
