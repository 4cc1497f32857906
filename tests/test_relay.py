"""The ingress relay on its own: a real `Pending` fed by hand-made replies, a small real gateway that counts what
the relay gives back. Whatever way a request ends, it is settled exactly once (its admission released once), and
a request whose pipeline has not finished when it ends has its provider call cancelled; one that finished has not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from switchyard.services.ingress.auth import Identity
from switchyard.services.ingress.relay import REPLY_GRACE_S, InFlight, Relay, joined
from switchyard.services.ingress.replies import REPLY_OVERHEAD, ClientGone, Pending
from switchyard.shared.contracts import OUT_OF_BAND, Reply, RequestEnvelope, now_ms
from switchyard.shared.errors import GatewayError
from switchyard.shared.prompt_log import PromptRecord


class CountingGateway:
    """What the relay needs of the ingress Gateway after submission, keeping count of each call."""

    def __init__(self) -> None:
        self.finished: list[int | None] = []
        self.cancelled: list[str] = []
        self.unregistered: list[str] = []
        self.records: list[PromptRecord | None] = []
        self.replies = self

    def unregister(self, request_id: str) -> None:
        self.unregistered.append(request_id)

    def finish(self, identity: Identity, admitted: Any, actual_tokens: int | None) -> None:
        self.finished.append(actual_tokens)

    def publish_cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    def publish_record(self, record: PromptRecord | None) -> None:
        self.records.append(record)


def _call(deadline_in_s: float = 30.0) -> InFlight:
    """A call whose wait for a reply ends `deadline_in_s` from now (the reply grace included)."""
    deadline = now_ms() + int((deadline_in_s - REPLY_GRACE_S) * 1000)
    envelope = RequestEnvelope(id="req-1", kind="chat", model="m", body={"model": "m"}, stream=True,
                               reply_topic="llm.replies", deadline_ms=deadline)
    return InFlight(envelope, Identity(key_id="k1"), estimate=None, pending=Pending())  # type: ignore[arg-type]


def _chunk(seq: int, text: str = "x") -> Reply:
    return Reply(id="req-1", seq=seq, type="chunk", data={"choices": [{"delta": {"content": text}}]})


def _end(seq: int, tokens: int = 7) -> Reply:
    return Reply(id="req-1", seq=seq, type="end", data={"usage": {"total_tokens": tokens}})


def _settled_once(gateway: CountingGateway) -> None:
    assert len(gateway.finished) == 1, gateway.finished
    assert gateway.unregistered == ["req-1"]
    assert len(gateway.records) == 1


async def _drain(stream: AsyncIterator[Reply]) -> list[Reply]:
    return [reply async for reply in stream]


async def test_a_normal_answer_settles_once_with_its_usage_and_cancels_nothing() -> None:
    gateway, call = CountingGateway(), _call()
    relay = Relay(gateway)  # type: ignore[arg-type]
    call.pending.offer(Reply(id="req-1", type="response", data={"usage": {"total_tokens": 12}}, provider_ms=5.0))
    first = await relay.first(call)
    assert first.type == "response"
    relay.settle(call, None)  # the response's close, too
    _settled_once(gateway)
    assert gateway.finished == [12] and call.provider_ms == 5.0
    assert gateway.cancelled == []


async def test_the_watcher_outlives_settlement_and_ends_with_the_response_changing_nothing() -> None:
    gateway, call = CountingGateway(), _call()
    relay = Relay(gateway)  # type: ignore[arg-type]
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    relay.watch(call, messages.get)
    call.pending.offer(Reply(id="req-1", type="response", data={"usage": {"total_tokens": 4}}))
    await relay.first(call)  # settles the call
    assert call.watcher is not None and not call.watcher.done()  # not cancelled: no CancelledError cycle
    await messages.put({"type": "http.disconnect"})  # what `receive` gives once the response is complete
    await call.watcher
    _settled_once(gateway)
    assert gateway.cancelled == [] and gateway.finished == [4]


async def test_an_error_reply_is_raised_and_settles_once_without_a_cancel() -> None:
    gateway, call = CountingGateway(), _call()
    relay = Relay(gateway)  # type: ignore[arg-type]
    body = {"error": {"message": "rate limited", "type": "rate_limit_error", "code": "rate_limited"}}
    call.pending.offer(Reply(id="req-1", type="error", status=429, data=body))
    with pytest.raises(GatewayError) as caught:
        await relay.first(call)
    assert caught.value.status == 429
    relay.settle(call, None)
    _settled_once(gateway)
    assert gateway.finished == [None] and gateway.cancelled == []


async def test_the_deadline_before_any_reply_is_a_504_and_cancels_the_call() -> None:
    gateway, call = CountingGateway(), _call(deadline_in_s=0.05)
    relay = Relay(gateway)  # type: ignore[arg-type]
    with pytest.raises(GatewayError) as caught:
        await relay.first(call)
    assert caught.value.status == 504
    _settled_once(gateway)
    assert gateway.cancelled == ["req-1"]


async def test_the_deadline_mid_stream_ends_it_with_a_504_error_reply() -> None:
    gateway, call = CountingGateway(), _call(deadline_in_s=0.2)
    relay = Relay(gateway)  # type: ignore[arg-type]
    call.pending.offer(_chunk(0))
    first = await relay.first(call)
    replies = await _drain(relay.rest(call, first))
    assert [r.type for r in replies] == ["chunk", "error"]
    assert replies[-1].status == 504 and (replies[-1].data or {})["error"]["code"] == "timeout"
    relay.settle(call, None)
    _settled_once(gateway)
    assert gateway.cancelled == ["req-1"]


async def test_a_stream_that_ends_settles_once_with_its_usage() -> None:
    gateway, call = CountingGateway(), _call()
    relay = Relay(gateway)  # type: ignore[arg-type]
    for reply in (_chunk(0, "a"), _chunk(1, "b"), _end(2, tokens=9)):
        call.pending.offer(reply)
    first = await relay.first(call)
    replies = await _drain(relay.rest(call, first))
    assert [r.type for r in replies] == ["chunk", "chunk", "end"]
    relay.settle(call, None)  # the streaming response's own close after the body
    _settled_once(gateway)
    assert gateway.finished == [9] and gateway.cancelled == []


async def test_a_stream_whose_first_reply_is_its_end_settles_once() -> None:
    gateway, call = CountingGateway(), _call()
    relay = Relay(gateway)  # type: ignore[arg-type]
    call.pending.offer(_end(0, tokens=3))
    first = await relay.first(call)
    await _drain(relay.rest(call, first))
    relay.settle(call, None)
    _settled_once(gateway)
    assert gateway.finished == [3] and gateway.cancelled == []


async def test_a_client_gone_mid_stream_ends_it_settles_once_and_cancels() -> None:
    gateway, call = CountingGateway(), _call()
    relay = Relay(gateway)  # type: ignore[arg-type]
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    relay.watch(call, messages.get)
    call.pending.offer(_chunk(0))
    first = await relay.first(call)
    stream = relay.rest(call, first)
    assert (await anext(stream)).type == "chunk"
    waiting = asyncio.ensure_future(anext(stream))  # the relay waits for the next chunk...
    await messages.put({"type": "http.disconnect"})  # ...when the client hangs up
    with pytest.raises(StopAsyncIteration):
        await waiting
    relay.settle(call, None)
    _settled_once(gateway)
    assert gateway.cancelled == ["req-1"] and gateway.finished == [None]
    assert call.watcher is not None and call.watcher.done()


async def test_a_client_gone_while_waiting_for_its_answer_cancels_the_call() -> None:
    gateway, call = CountingGateway(), _call()
    relay = Relay(gateway)  # type: ignore[arg-type]
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    relay.watch(call, messages.get)
    waiting = asyncio.ensure_future(relay.first(call))
    await messages.put({"type": "http.request", "body": b"", "more_body": False})  # not a disconnect: ignored
    await messages.put({"type": "http.disconnect"})
    with pytest.raises(ClientGone) as caught:
        await waiting
    assert caught.value.status == 499
    _settled_once(gateway)
    assert gateway.cancelled == ["req-1"]


async def test_a_stream_abandoned_before_its_first_byte_settles_once_through_its_close() -> None:
    gateway, call = CountingGateway(), _call()
    relay = Relay(gateway)  # type: ignore[arg-type]
    call.pending.offer(_chunk(0))
    first = await relay.first(call)
    relay.sse(call, first)  # never iterated: the client left before the response started
    relay.settle(call, None)
    _settled_once(gateway)
    assert gateway.cancelled == ["req-1"]


async def test_a_stream_cut_by_ingress_for_a_slow_reader_still_cancels_the_provider_call() -> None:
    gateway, call = CountingGateway(), _call()
    relay = Relay(gateway)  # type: ignore[arg-type]
    call.pending = Pending(limit=2 * REPLY_OVERHEAD)  # two chunks' worth
    for seq in range(4):
        call.pending.offer(_chunk(seq))
    first = await relay.first(call)
    replies = await _drain(relay.rest(call, first))
    assert replies[-1].type == "error" and replies[-1].seq == OUT_OF_BAND
    assert (replies[-1].data or {})["error"]["code"] == "stream_buffer_full"
    _settled_once(gateway)
    assert gateway.cancelled == ["req-1"]


async def test_sse_frames_chunks_errors_and_done() -> None:
    gateway, call = CountingGateway(), _call()
    relay = Relay(gateway)  # type: ignore[arg-type]
    for reply in (_chunk(0, "a"), _end(1)):
        call.pending.offer(reply)
    first = await relay.first(call)
    frames = [frame async for frame in relay.sse(call, first)]
    assert frames[0].startswith(b"data: {") and frames[-1] == b"data: [DONE]\n\n" and len(frames) == 2
    _settled_once(gateway)


async def test_a_streams_last_chunks_carried_by_its_end_are_relayed_in_order_before_done() -> None:
    gateway, call = CountingGateway(), _call()
    relay = Relay(gateway)  # type: ignore[arg-type]
    call.pending.offer(_chunk(0, "a"))
    call.pending.offer(Reply(id="req-1", seq=1, type="end", data={"usage": {"total_tokens": 3}},
                             chunks=[{"choices": [{"delta": {"content": t}}]} for t in ("b", "c")]))
    first = await relay.first(call)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await relay.stream(call, relay.sse(call, first), {}).stream_response(send)
    bodies = [(m["body"], m["more_body"]) for m in sent if m["type"] == "http.response.body"]
    frame = b'data: {"choices":[{"delta":{"content":"%s"}}]}\n\n'
    # Everything was already queued: one write, and it ends the response (no empty message after it).
    assert bodies == [(frame % b"a" + frame % b"b" + frame % b"c" + b"data: [DONE]\n\n", False)]
    _settled_once(gateway)
    assert gateway.finished == [3]


async def test_frames_of_replies_already_here_leave_as_one_write_and_none_waits_for_a_later_one() -> None:
    gateway, call = CountingGateway(), _call()
    relay = Relay(gateway)  # type: ignore[arg-type]
    call.pending.offer(Reply(id="req-1", seq=0, type="chunk", data={"choices": [{"delta": {"content": "a"}}]},
                             chunks=[{"choices": [{"delta": {"content": "b"}}]}]))  # two chunks in one message
    call.pending.offer(_chunk(1, "c"))
    first = await relay.first(call)
    writes = joined(relay.sse(call, first), call.pending)
    assert await anext(writes) == b"".join(
        b'data: {"choices":[{"delta":{"content":"%s"}}]}\n\n' % text for text in (b"a", b"b", b"c"))
    later = asyncio.ensure_future(anext(writes))  # nothing is queued: the next write waits for the next reply
    await asyncio.sleep(0)
    assert not later.done()
    call.pending.offer(_chunk(2, "d"))
    assert await later == b'data: {"choices":[{"delta":{"content":"d"}}]}\n\n'  # sent alone, at once
    call.pending.offer(_end(3))
    assert await anext(writes) == b"data: [DONE]\n\n"
    await writes.aclose()
    _settled_once(gateway)
    assert gateway.cancelled == []
