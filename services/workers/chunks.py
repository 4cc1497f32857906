"""A stream's chunks on their way to the caller: as few Kafka messages as the broker's pace allows.

A provider streams chunks every few milliseconds; one Kafka message per chunk cost a produce, a fetch,
a parse and a Task on each side for every token. Here the first chunk leaves at once (time to first
token is untouched), and while a message waits for the broker's acknowledgement the chunks that arrive
gather and leave together as the next message, the moment it is acknowledged. So a chunk is never held
back longer than one acknowledgement, and a fast stream costs a message per round trip, not per token.

While the broker is slower than the provider, the chunks waiting are bounded (MAX_HELD): past it, `add`
waits for the acknowledgement, so the provider's connection is read no faster than Kafka takes its chunks
and a backlog stays in the provider's socket, not in this process's memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

MAX_HELD = 16
"""The most chunks one stream holds while its previous message is unacknowledged: about 1 KB of Python objects
each, so 16 KB a stream, 8 MB for 512 streams behind a slow broker (64 held 25 MB for 255 streams). Sixteen
chunks to a message still take the per-message cost off all but one chunk in sixteen."""

SendChunks = Callable[[list[dict[str, Any]], int], "asyncio.Future[Any]"]
"""Send these chunks as the message with this `seq`; the future ends when the broker acknowledged it."""


class ChunkStream:
    """Buffers chunks while a message is unacknowledged; each message takes the next `seq`.

    Messages are sent in `seq` order and readers put them back in that order, so the text arrives whole
    and in order whatever the broker's batching does. `close` sends what is left and returns the next
    free `seq` (for an `error` message); `finish` hands what is left to the stream's `end` message
    instead. `sent` holds the futures of the messages not yet acknowledged, and of any that failed: what
    the caller must still wait for or report. An acknowledged message's future is dropped at once, so a
    long stream holds a few futures, not one per message.
    """

    def __init__(self, send: SendChunks) -> None:
        self._send = send
        self._buffer: list[dict[str, Any]] = []
        self._unacked: asyncio.Future[Any] | None = None
        self.seq = 0
        self.sent: list[asyncio.Future[Any]] = []

    async def add(self, chunk: dict[str, Any]) -> None:
        """Queue a chunk; it leaves now unless a message is still waiting for its acknowledgement. With
        MAX_HELD chunks waiting, returns only once that message is acknowledged (and the chunks have left)."""
        self._buffer.append(chunk)
        if self._unacked is None or self._unacked.done():
            self._flush()
        elif len(self._buffer) >= MAX_HELD:
            await asyncio.wait([self._unacked])  # its failure is the caller's to see in `sent`, not here
            if self._unacked.done():
                self._flush()

    def close(self) -> int:
        """Send whatever is still buffered (without waiting for an acknowledgement); the next free `seq`."""
        self._flush()
        return self.seq

    def finish(self) -> tuple[list[dict[str, Any]], int]:
        """End the stream without sending what is still buffered: those chunks, for the stream's `end` message
        to carry (one message fewer per stream), and that message's `seq`."""
        chunks, self._buffer = self._buffer, []
        self._unacked = None
        return chunks, self.seq

    def _flush(self) -> None:
        if not self._buffer:
            return
        chunks, self._buffer = self._buffer, []
        future = self._send(chunks, self.seq)
        self.seq += 1
        self.sent.append(future)
        self._unacked = future
        future.add_done_callback(self._acknowledged)

    def _acknowledged(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.sent.remove(future)
        if future is self._unacked:
            self._flush()
