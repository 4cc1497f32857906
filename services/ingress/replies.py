"""The reply partition this ingress instance owns, and the callers waiting on it.

Each instance reads exactly one partition of `llm.replies` (no consumer group, no
rebalancing), so replies reach the instance holding the connection and no other.
Redelivered messages are dropped by (attempt, seq).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import ValidationError

from switchyard.shared import tracing
from switchyard.shared.contracts import OUT_OF_BAND, REPLY_VERSION, Reply
from switchyard.shared.errors import GatewayError
from switchyard.shared.kafka import make_consumer, start_client, topic_partitions
from switchyard.shared.parts import join

log = logging.getLogger("switchyard.ingress.replies")

STREAM_BUFFER_ENV = "SWITCHYARD_STREAM_BUFFER_BYTES"
STREAM_BUFFER_TOTAL_ENV = "SWITCHYARD_STREAM_BUFFER_TOTAL_BYTES"
STREAM_BUFFER = int(os.environ.get(STREAM_BUFFER_ENV) or 1 << 20)
"""The most memory one caller's unread replies may hold: a client reading slower than its stream arrives has its
stream ended with a 503 `stream_buffer_full` error instead of growing this process's memory."""
STREAM_BUFFER_TOTAL = int(os.environ.get(STREAM_BUFFER_TOTAL_ENV) or 16 << 20)
"""The most memory the unread replies of all callers of this process may hold together. Past it, a stream
holding more than its fair share (this total over the requests waiting) is ended the same way, so a thousand
slow readers cannot add up to more than this, while a reader that keeps up is never cut for the others."""
REPLY_OVERHEAD = 1024
"""What a parsed reply costs beyond its bytes on the wire, per chunk it carries (measured: a small chat chunk of
~180 wire bytes is ~1.2 KB of Python objects once parsed)."""


def reply_cost(wire_bytes: int, reply: Reply) -> int:
    """The memory a queued reply holds, as counted against the buffers' limits."""
    return wire_bytes + REPLY_OVERHEAD * (1 + len(reply.chunks))


class StreamBuffers:
    """The memory held by unread replies across every request of this process, and how many requests wait."""

    __slots__ = ("total", "used", "readers")

    def __init__(self, total: int = STREAM_BUFFER_TOTAL) -> None:
        self.total = total
        self.used = 0
        self.readers = 0

    def share(self) -> int:
        """One waiting request's fair share of the total."""
        return self.total // max(1, self.readers)


class ReplyQueue:
    """The replies waiting for one reader, each with its cost: put never blocks, `get` waits for one within a
    timeout. `bytes` is the cost of what is queued, also counted in `buffers` until `release`.

    What one request needs of asyncio.Queue, without its cost (a Queue builds two deques, an Event and a
    future per waiter; one per request showed as ~9% of ingress CPU in py-spy): one deque and, only while the
    reader waits, one future.
    """

    __slots__ = ("_items", "_waiter", "bytes", "_buffers")

    def __init__(self, buffers: StreamBuffers | None = None) -> None:
        self._items: deque[tuple[Reply, int]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.bytes = 0
        self._buffers = buffers

    def put_nowait(self, reply: Reply, cost: int = 0) -> None:
        self._items.append((reply, cost))
        self.bytes += cost
        if self._buffers is not None:
            self._buffers.used += cost
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_nowait(self) -> Reply:
        reply, cost = self._items.popleft()  # IndexError when empty, as only a bug would ask
        self.bytes -= cost
        if self._buffers is not None:
            self._buffers.used -= cost
        return reply

    def release(self) -> None:
        """Stop counting what is queued against the shared buffers (its request is over)."""
        if self._buffers is not None:
            self._buffers.used -= self.bytes
            self._buffers = None

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self, timeout_s: float) -> Reply:
        """The next reply; TimeoutError when none comes within `timeout_s`.

        The wait is bounded by a timer that fails the waiter's future, not by `asyncio.timeout`, which cancels
        the task and turns the cancellation back into a TimeoutError (a stream waits once per message: that
        machinery was ~2 % of ingress CPU on a streaming load)."""
        if not self._items:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(max(0.0, timeout_s), _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self.get_nowait()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class ClientGone(GatewayError):
    """The client closed its connection before its answer (499, as nginx counts it): nobody reads a response."""

    def __init__(self) -> None:
        super().__init__(499, "The client closed the connection before the answer.", code="client_closed_request")


class Pending:
    """The replies of one request, in `seq` order, without duplicates.

    Messages of a newer attempt supersede an older one; a stream's chunks are re-ordered
    if a retried delivery overtook them; an out-of-band error (seq >= OUT_OF_BAND) ends it at once.
    Within an attempt, only the provider call whose messages reached the caller first is followed:
    the same attempt called again (its first worker died before committing) answers differently, so
    a stream it interrupted ends with an error rather than with another generation's text.
    A response sent in parts (shared/parts.py) is joined here, so callers only ever see it whole; while
    nothing but parts has arrived, nothing has reached the caller either, so a call redone after a crash
    simply replaces the parts of the one it redoes.
    """

    def __init__(self, limit: int | None = None, buffers: StreamBuffers | None = None) -> None:
        self.limit = limit or STREAM_BUFFER
        self.buffers = buffers or StreamBuffers()
        self.queue = ReplyQueue(self.buffers)
        self.attempt = 0
        self.next_seq = 0
        self.call: str | None = None
        self._ahead: dict[int, Reply] = {}
        self._sizes: dict[int, int] = {}
        self._parts: list[Reply] = []
        self._abandoned: set[str] = set()
        self.finished = False
        self._done = False
        self._gone = False

    def offer(self, reply: Reply, wire_bytes: int = 0) -> None:
        """Take one reply as it came from Kafka (`wire_bytes`: its size there, for the buffers' limits)."""
        if self.finished or reply.attempt < self.attempt:
            return
        if reply.attempt > self.attempt:
            self.attempt, self.next_seq, self.call = reply.attempt, 0, None
            self._ahead.clear()
            self._sizes.clear()
            self._parts.clear()
        if reply.seq >= OUT_OF_BAND:
            self._emit(reply)
            return
        self._sizes[reply.seq] = wire_bytes
        if reply.call is not None:
            if self.call is None:
                self.call = reply.call
            elif reply.call != self.call:
                if self.next_seq > len(self._parts):
                    self._emit(_interrupted(reply), local=True)
                    return
                if not self._parts or reply.seq != 0 or reply.call in self._abandoned:
                    return
                self._abandoned.add(self.call)  # the call was redone: follow the new one from its start
                self.call, self.next_seq = reply.call, 0
                self._parts.clear()
                self._ahead.clear()
                self._sizes.clear()
        if reply.seq < self.next_seq:
            return  # a duplicate delivery
        self._ahead[reply.seq] = reply
        while not self.finished and self.next_seq in self._ahead:
            self._emit(self._ahead.pop(self.next_seq), wire_bytes=self._sizes.pop(self.next_seq, 0))
            self.next_seq += 1

    def _emit(self, reply: Reply, local: bool = False, wire_bytes: int = 0) -> None:
        """Queue a reply for the caller, or end the stream when the caller leaves too much unread (over its own
        limit, or over its fair share while the process's total is spent). `local`: an error ingress made
        itself, while the provider call may still be running."""
        if reply.type == "part":
            self._parts.append(reply)
            return
        if reply.type == "response" and reply.parts:
            reply = _joined(self._parts, reply)
        cost = 0
        if reply.type in ("response", "end", "error"):
            self.finished = True
            self._done = not local
        else:
            cost = reply_cost(wire_bytes, reply)
            held, buffers = self.queue.bytes + cost, self.buffers
            if held > self.limit or (buffers.used + cost > buffers.total and held > buffers.share()):
                reply, self.finished, cost = _overflowed(reply), True, 0
        self.queue.put_nowait(reply, cost)

    @property
    def done(self) -> bool:
        """Whether the pipeline sent this request's last message (an answer, a stream's end, an error of its
        own): no provider call is left working for it. An error ingress made itself (a stream it cut for a slow
        reader, a redone call it refused) leaves the call running, so it is not done."""
        return self._done

    @property
    def ready(self) -> bool:
        """Whether `next` returns without waiting: a reply (or the news that the client left) is already here."""
        return not self.queue.empty()

    def client_gone(self) -> None:
        """The client left: the reader's `next` raises ClientGone from now on, whatever is queued."""
        self._gone = True
        self.queue.put_nowait(_GONE)  # wakes a reader waiting now

    async def next(self, timeout_s: float) -> Reply:
        """The next reply, within `timeout_s` (TimeoutError); ClientGone once the client left. A message of
        several stream chunks is one reply (`Reply.pieces`): its readers render them together, without a copy
        of the message per chunk."""
        if self._gone:
            raise ClientGone()
        reply = await self.queue.get(timeout_s)  # no Task per wait, unlike wait_for on 3.11
        if self._gone:
            raise ClientGone()
        return reply

    def release(self) -> None:
        """The request is over: what it left unread no longer counts against the process's total."""
        self.queue.release()


_GONE = Reply(id="", type="error", status=499)
"""Only wakes a reader; `Pending.next` never returns it."""


def _overflowed(reply: Reply) -> Reply:
    err = GatewayError(503, "the client read this stream too slowly: more of it was waiting unread than the "
                            "gateway holds for one stream, so it ended the stream", code="stream_buffer_full",
                       retry_after_s=1)
    return Reply(id=reply.id, attempt=reply.attempt, seq=OUT_OF_BAND, type="error", status=err.status,
                 data=err.body(), headers=err.response_headers(), custom_id=reply.custom_id)


def _joined(parts: list[Reply], response: Reply) -> Reply:
    """The response its parts carry, or a 502 when they do not make one (never expected: logged)."""
    try:
        return join(parts, response)
    except ValueError as e:
        log.error("a reply's parts do not join", extra={"request_id": response.id, "error": str(e)})
        err = GatewayError(502, "The answer to this request arrived incomplete; retry the request.",
                           type="api_error", code="reply_incomplete")
        return Reply(id=response.id, attempt=response.attempt, seq=OUT_OF_BAND, type="error", status=err.status,
                     data=err.body(), custom_id=response.custom_id)


def _interrupted(reply: Reply) -> Reply:
    err = GatewayError(502, "the provider call streaming this response was interrupted (its worker stopped) and "
                            "the request was called again; retry the request", type="api_error",
                       code="stream_interrupted")
    return Reply(id=reply.id, attempt=reply.attempt, seq=OUT_OF_BAND, type="error", status=err.status,
                 data=err.body(), custom_id=reply.custom_id)


class ReplyListener:
    def __init__(self, bootstrap: str, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        # Starts at the end (see start); should the position ever fall outside the log, the earliest offset is
        # the one that skips no reply: a re-created log (Tansu restarted) holds only replies written since,
        # which callers may still wait for (`RewindingConsumer` rewinds such a partition by itself).
        self._consumer: AIOKafkaConsumer = make_consumer(bootstrap=bootstrap, group_id=None,
                                                         tansu_fetch_wait_ms=2,
                                                         auto_offset_reset="earliest")
        self._pending: dict[str, Pending] = {}
        self.buffers = StreamBuffers()
        self._task: asyncio.Task[None] | None = None
        self.ready = False

    async def start(self) -> None:
        await start_client(self._consumer, "reply-listener")
        tp = TopicPartition(self.topic, self.partition)
        partitions = await topic_partitions(self._consumer, self.topic)
        if tp not in partitions:
            raise RuntimeError(f"{self.topic} has no partition {self.partition} (it has {len(partitions)})")
        self._consumer.assign([tp])
        await self._consumer.seek_to_end(tp)
        await self._consumer.position(tp)  # resolve the position now, before any request is sent
        self._task = asyncio.create_task(self._run())
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    def register(self, request_id: str) -> Pending:
        pending = Pending(buffers=self.buffers)
        self._pending[request_id] = pending
        self.buffers.readers += 1
        return pending

    def unregister(self, request_id: str) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            pending.release()
            self.buffers.readers -= 1

    @property
    def waiting(self) -> int:
        return len(self._pending)

    async def _run(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=1000, max_records=1000)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reply fetch failed; retrying")
                await asyncio.sleep(0.5)
                continue
            for records in batches.values():
                for record in records:
                    self._offer(record)

    def _offer(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Hand one record to the caller waiting for it. The key is the request id, so records nobody here
        waits for (callers gone, another gateway's requests) are skipped without being parsed."""
        if record.key is not None and record.key.decode(errors="replace") not in self._pending:
            return
        try:  # orjson, then the model: 7 vs 11 µs for a message of three stream chunks (pydantic's own JSON reader)
            reply = Reply.model_validate(orjson.loads(record.value or b""))
        except (orjson.JSONDecodeError, ValidationError):
            log.error("dropping malformed reply", extra={"offset": record.offset})
            return
        pending = self._pending.get(reply.id)
        if pending is None:
            return
        if reply.v > REPLY_VERSION:
            err = GatewayError(502, f"a worker sent a version {reply.v} reply, newer than this ingress reads "
                                    f"({REPLY_VERSION}); upgrade ingress before the workers", type="api_error",
                               code="reply_version")
            reply = Reply(id=reply.id, attempt=reply.attempt, seq=OUT_OF_BAND, type="error", status=err.status,
                          data=err.body())
        if tracing.enabled() and (reply.seq == 0 or reply.type != "chunk"):
            tracing.wait_in_topic(self.topic, tracing.from_record(record.headers), record.timestamp)
        pending.offer(reply, len(record.value or b""))
