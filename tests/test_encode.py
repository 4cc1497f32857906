"""What services put on Kafka (`shared/kafka_delivery.encode`): every contract, nested models included, is
the same JSON document pydantic writes and reads back as the same message; a caller's body that only
pydantic can write (an integer past 64 bits) is still written, not refused."""

from __future__ import annotations

import orjson
from pydantic import BaseModel
from pydantic_core import to_json

from switchyard.shared.contracts import (
    AttemptEvent,
    AttemptRecord,
    CancelRequest,
    KeyEvent,
    LossyPart,
    NativeRequest,
    Reply,
    RequestEnvelope,
    Usage,
    UsageEvent,
)
from switchyard.shared.kafka_delivery import encode
from switchyard.shared.prompt_log import PromptRecord

CHUNK = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "é\n"},
                                                                     "finish_reason": None}], "x": [1.5, True]}

MESSAGES: list[BaseModel] = [
    RequestEnvelope(id="r1", model="m", body={"messages": [{"role": "user", "content": "hi"}], "temperature": 0.2},
                    reply_topic="llm.replies", reply_partition=3, metadata={"team": "a"},
                    native=NativeRequest(format="anthropic", body={"max_tokens": 5}, lossy=LossyPart(
                        param="tools", message="m")), v=2,
                    history=[AttemptRecord(deployment="d", status=429, error_type="rate_limit_error", message="x",
                                           retry_after_s=1.5)]),
    Reply(id="r1", seq=2, type="chunk", data=CHUNK, chunks=[CHUNK, CHUNK], headers={"x-route": "a"}, call="e1"),
    Reply(id="r1", type="response", data={"choices": []}, provider_ms=12.25, usage={"total_tokens": 3}),
    UsageEvent(event_id="e1", request_id="r1", attempt=0, provider="openai", deployment="d", model_group="m",
               provider_model="gpt", usage=Usage(prompt_tokens=3, completion_tokens=4), ttft_ms=1.0),
    AttemptEvent(request_id="r1", attempt=1, deployment="d", provider="openai", model_group="m", ok=False,
                 status=503, error_type="api_error", phase="start"),
    KeyEvent(key_id="k", action="created", detail={"budget": 1.5}),
    CancelRequest(request_id="r1"),
    PromptRecord(request_id="r1", model="m", request={"messages": []}, timings={"total_ms": 1.5}),
]


def test_every_contract_encodes_as_pydantic_writes_it_and_reads_back_the_same() -> None:
    for message in MESSAGES:
        encoded = encode(message)
        assert orjson.loads(encoded) == orjson.loads(to_json(message)), type(message).__name__
        assert type(message).model_validate_json(encoded) == message


def test_a_body_only_pydantic_can_write_is_still_written_whole() -> None:
    envelope = RequestEnvelope(id="r1", model="m", body={"seed": 2**70}, reply_topic="llm.replies")
    assert RequestEnvelope.model_validate_json(encode(envelope)).body == {"seed": 2**70}
