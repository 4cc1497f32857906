"""What a caller receives when replies arrive twice, out of order, or from a call redone after a crash."""

from __future__ import annotations

from aiokafka import ConsumerRecord

from switchyard.services.ingress.replies import Pending, ReplyListener
from switchyard.shared.contracts import OUT_OF_BAND, Reply
from switchyard.shared.kafka_delivery import encode


def _chunk(seq: int, call: str, attempt: int = 0) -> Reply:
    return Reply(id="r1", attempt=attempt, seq=seq, type="chunk", data={"text": f"{call}{seq}"}, call=call)


def _received(pending: Pending) -> list[tuple[str, int, str | None]]:
    out: list[tuple[str, int, str | None]] = []
    while not pending.queue.empty():
        r = pending.queue.get_nowait()
        out.append((r.type, r.seq, (r.data or {}).get("text") or (r.data or {}).get("error", {}).get("code")))
    return out


def test_duplicates_are_dropped_and_chunks_reordered() -> None:
    pending = Pending()
    for reply in (_chunk(1, "a"), _chunk(0, "a"), _chunk(0, "a"), _chunk(2, "a")):
        pending.offer(reply)
    assert _received(pending) == [("chunk", 0, "a0"), ("chunk", 1, "a1"), ("chunk", 2, "a2")]


def test_a_stream_redone_by_another_call_ends_with_an_error_not_spliced_text() -> None:
    pending = Pending()
    pending.offer(_chunk(0, "a"))
    pending.offer(_chunk(1, "a"))  # then the worker streaming call "a" dies; the request is called again
    for seq in range(4):
        pending.offer(_chunk(seq, "b"))
    received = _received(pending)
    assert received[:2] == [("chunk", 0, "a0"), ("chunk", 1, "a1")]
    assert received[2][0] == "error" and received[2][1] >= OUT_OF_BAND and received[2][2] == "stream_interrupted"
    assert len(received) == 3 and pending.finished


def test_a_finished_answer_ignores_the_repeated_call() -> None:
    pending = Pending()
    pending.offer(Reply(id="r1", type="response", data={"text": "first"}, call="a"))
    pending.offer(Reply(id="r1", type="response", data={"text": "second"}, call="b"))
    assert _received(pending) == [("response", 0, "first")]


def test_a_new_attempt_follows_its_own_call() -> None:
    pending = Pending()
    pending.offer(_chunk(0, "a"))
    pending.offer(_chunk(0, "b", attempt=1))  # the router retried elsewhere: a new attempt, not a redone call
    pending.offer(_chunk(1, "b", attempt=1))
    assert _received(pending) == [("chunk", 0, "a0"), ("chunk", 0, "b0"), ("chunk", 1, "b1")]


def _record(value: bytes, offset: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("llm.replies", 0, offset, 0, 0, b"r1", value, None, 2, len(value), [])


async def test_a_record_on_the_reply_partition_that_is_no_reply_is_dropped_and_the_caller_still_answered() -> None:
    listener = ReplyListener("127.0.0.1:9", "llm.replies", 0)  # never started: `_offer` is fed by hand
    pending = listener.register("r1")
    hostile = [b"", b"not json", b"[1, 2]", b'{"id": "r1"}', b'{"id": "r1", "type": "chunk", "seq": "x"}',
               b'{"id": "r1", "type": "chunk", "chunks": 5}', b'{"id": "r1", "type": "nope"}', b"\xff\xfe"]
    for offset, raw in enumerate(hostile):
        listener._offer(_record(raw, offset))
    assert not pending.ready
    listener._offer(_record(encode(Reply(id="r1", type="response", data={"ok": True})), len(hostile)))
    assert (await pending.next(1.0)).data == {"ok": True}
