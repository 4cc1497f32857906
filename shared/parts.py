"""Replies too large for one Kafka message, sent in pieces and joined again by whoever reads them.

A non-streaming answer can outgrow what a message may have: an embeddings reply for many inputs of
many dimensions is easily tens of MiB of JSON (300 inputs x 4096 dimensions is 22 MiB), more than
the 16 MiB a gateway topic accepts, and far more than a reply topic a batch producer created with
Kafka's defaults (about 1 MiB). Refusing it would throw away a provider call that was made and paid
for, so the worker splits the answer's JSON text into `part` replies of at most PART_BYTES each
(small enough for a topic with Kafka's default limit) and then sends the `response` itself with
`parts` set and no data. The pieces share the request's key and reply partition, so they arrive in
order; ingress (services/ingress/replies.py) and batch jobs (shared/batch.py) join them.

Only an answer over MAX_REPLY_BYTES in all (SWITCHYARD_MAX_REPLY_BYTES, 128 MiB) is refused instead,
with a 413: past that, holding it in ingress's memory for one caller costs more than it is worth.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from switchyard.shared.contracts import Reply

PART_BYTES = 512 << 10
"""The most bytes of the answer's JSON one `part` carries: with the escaping of quotes, a part message
stays under the 1 MiB that Kafka's defaults allow a topic, so any reply topic can take it."""

MAX_REPLY_BYTES = int(os.environ.get("SWITCHYARD_MAX_REPLY_BYTES", str(128 << 20)))
"""The largest answer (its JSON) that is delivered at all, in pieces; a larger one is answered with a 413."""

TEXT = "text"
"""The key of a part's piece of JSON text in its `data`."""


def pieces(data: bytes, size: int = PART_BYTES) -> list[str]:
    """`data` (UTF-8 JSON) cut into strings of at most `size` bytes each, never inside a character."""
    out: list[str] = []
    start = 0
    while start < len(data):
        end = min(len(data), start + size)
        while end < len(data) and end > start + 1 and (data[end] & 0xC0) == 0x80:
            end -= 1  # a continuation byte: cut before the character it belongs to
        out.append(data[start:end].decode())
        start = end
    return out


def split(reply: Reply, data: bytes, size: int = PART_BYTES) -> list[Reply]:
    """The messages that carry `reply` (a `response`) whose data encodes to `data`: its parts, in seq order,
    then the response itself with `parts` set and no data."""
    texts = pieces(data, size)
    parts = [Reply(id=reply.id, attempt=reply.attempt, seq=i, type="part", data={TEXT: text},
                   custom_id=reply.custom_id, call=reply.call) for i, text in enumerate(texts)]
    return [*parts, reply.model_copy(update={"data": None, "parts": len(texts), "seq": len(texts)})]


def join(parts: list[Reply], response: Reply) -> Reply:
    """`response` with its data rebuilt from its `parts` (in seq order); ValueError when they do not add up
    to a JSON object (a part missing or not a part)."""
    if len(parts) != response.parts:
        raise ValueError(f"{len(parts)} of {response.parts} parts")
    texts = [(p.data or {}).get(TEXT) for p in parts]
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("a part carries no text")
    try:
        data: Any = orjson.loads("".join(t for t in texts if isinstance(t, str)))
    except orjson.JSONDecodeError as e:
        raise ValueError(f"the parts do not join into JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("the parts do not join into a JSON object")
    return response.model_copy(update={"data": data})


class Assembler:
    """Joins the parts of the replies read from one reply topic, for a reader without ordering of its own
    (a batch job): parts are kept per (request, attempt, call) until their response arrives, duplicates
    count once, and what belongs to a request is dropped when the reader is done with it (`forget`)."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, int, str | None], dict[int, Reply]] = {}

    def offer(self, reply: Reply) -> Reply | None:
        """The reply to act on: `reply` itself, or a response with its data joined; None for a part (kept)
        and for a response whose parts are not all here (a redelivery may bring them)."""
        key = (reply.id, reply.attempt, reply.call)
        if reply.type == "part":
            self._parts.setdefault(key, {})[reply.seq] = reply
            return None
        if reply.type != "response" or not reply.parts:
            return reply
        held = self._parts.get(key, {})
        if any(seq not in held for seq in range(reply.parts)):
            return None
        return join([held[seq] for seq in range(reply.parts)], reply)

    def forget(self, request_id: str) -> None:
        for key in [k for k in self._parts if k[0] == request_id]:
            del self._parts[key]
