"""A stream's chunks on their way to Kafka (services/workers/chunks.py), against hand-acknowledged sends: chunks
gather while a message is unacknowledged, leave together in order, and a stream never holds more than MAX_HELD
of them (the provider is read no faster than the broker acknowledges)."""

from __future__ import annotations

import asyncio
from typing import Any

from switchyard.services.workers.chunks import MAX_HELD, ChunkStream


class Sends:
    """The messages a stream sent, each acknowledged only when the test says so."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[dict[str, Any]], int]] = []
        self.futures: list[asyncio.Future[Any]] = []

    def __call__(self, chunks: list[dict[str, Any]], seq: int) -> asyncio.Future[Any]:
        self.messages.append((chunks, seq))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future


async def test_chunks_gather_while_unacknowledged_and_leave_in_order() -> None:
    sends = Sends()
    stream = ChunkStream(sends)
    for i in range(5):
        await stream.add({"i": i})
    assert [len(chunks) for chunks, _ in sends.messages] == [1]  # the first leaves at once, the rest wait
    sends.futures[0].set_result(None)
    await asyncio.sleep(0)  # the acknowledgement's callback
    assert [(len(chunks), seq) for chunks, seq in sends.messages] == [(1, 0), (4, 1)]
    assert stream.close() == 2
    assert [c["i"] for chunks, _ in sends.messages for c in chunks] == list(range(5))


async def test_a_stream_holds_at_most_max_held_chunks_while_the_broker_is_slow() -> None:
    sends = Sends()
    stream = ChunkStream(sends)
    await stream.add({"i": 0})
    for i in range(1, MAX_HELD):
        await stream.add({"i": i})
    blocked = asyncio.create_task(stream.add({"i": MAX_HELD}))
    for _ in range(5):
        await asyncio.sleep(0)  # let it run as far as it goes
    assert not blocked.done()  # MAX_HELD chunks wait: the provider is not read further
    sends.futures[0].set_exception(RuntimeError("the broker refused it"))  # a failure also lets it go on
    await asyncio.wait_for(blocked, 5)
    assert len(sends.messages) == 2 and len(sends.messages[1][0]) == MAX_HELD


async def test_a_long_stream_keeps_only_what_is_unacknowledged_or_failed() -> None:
    sends = Sends()
    stream = ChunkStream(sends)
    for i in range(100):  # a long stream: each message acknowledged before the next chunk
        await stream.add({"i": i})
        sends.futures[-1].set_result(None)
        await asyncio.sleep(0)
    assert len(sends.messages) == 100 and stream.sent == []  # no future kept per message sent
    await stream.add({"i": 100})
    sends.futures[-1].set_exception(RuntimeError("the broker refused it"))
    await asyncio.sleep(0)
    await stream.add({"i": 101})
    assert stream.sent == sends.futures[-2:]  # the failure, for the caller to report, and the one in flight


async def test_finish_hands_the_chunks_still_held_to_the_end_message_and_sends_nothing_more() -> None:
    sends = Sends()
    stream = ChunkStream(sends)
    for i in range(3):
        await stream.add({"i": i})
    last, seq = stream.finish()  # the first message is still unacknowledged: two chunks are held
    assert [c["i"] for c in last] == [1, 2] and seq == 1
    sends.futures[0].set_result(None)
    await asyncio.sleep(0)  # its acknowledgement flushes nothing: the end message carries them
    assert [seq for _, seq in sends.messages] == [0] and stream.sent == []
