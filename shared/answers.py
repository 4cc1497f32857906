"""Error answers a stage gives on a request's behalf, including requests whose envelope cannot be read.

Every accepted request ends in one terminal answer on its reply topic (DESIGN.md, invariant 1). Ingress
only writes envelopes every stage can read, but a batch producer writes to `llm.requests` directly, and
what it writes may not validate: a field missing or of the wrong type, a newer contract, nesting deeper
than the JSON parser of the router accepts. Such an envelope is not dropped in silence:
- when its id and reply destination can still be read (`salvage` reads the top-level members of the
  JSON object however deep the rest nests, without parsing it), it is answered there with a 400
  `invalid_envelope` that says what is wrong (field names and messages, never the values: they hold
  prompts);
- otherwise it goes to `llm.dead` as it came, with the reason `unreadable` (shared/dead.py), where
  `switchyard dead list` shows it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]  # the decoder's own string scanner
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaProducer, ConsumerRecord
from pydantic import BaseModel, ValidationError

from switchyard.shared import topics, tracing
from switchyard.shared.contracts import OUT_OF_BAND, Reply, RequestEnvelope
from switchyard.shared.dead import UNREADABLE, bury, bury_consumed, send_or_bury
from switchyard.shared.errors import GatewayError
from switchyard.shared.kafka_delivery import Headers, check_destination, encode
from switchyard.shared.kafka_destinations import DeliveryRefused

log = logging.getLogger("switchyard.answers")


async def answer(producer: AIOKafkaProducer, env: RequestEnvelope, err: GatewayError, *, service: str) -> Any:
    """Send `err` as the request's terminal answer (out of band: it ends the request at once, whatever was
    sent before); dead-lettered when its reply destination does not exist."""
    log.info("answering with error", extra={"request_id": env.id, "status": err.status, "code": err.code})
    reply = Reply(id=env.id, attempt=env.attempt, seq=OUT_OF_BAND, type="error", status=err.status,
                  data=err.body(), headers=err.response_headers(), custom_id=env.custom_id)
    return await send_or_bury(producer, env.reply_topic, encode(reply), key=env.id.encode(),
                              partition=env.reply_partition, service=service, request_id=env.id,
                              headers=tracing.current_headers())


def problems(error: ValidationError, limit: int = 5) -> str:
    """What is wrong with a message, by field, without the values (which may hold prompts or secrets)."""
    found = []
    for item in error.errors(include_url=False, include_input=False)[:limit]:
        where = ".".join(str(part) for part in item["loc"])
        found.append(f"{where}: {item['msg']}" if where else str(item["msg"]))
    more = error.error_count() - limit
    return "; ".join(found) + (f" (and {more} more)" if more > 0 else "")


M = TypeVar("M", bound=BaseModel)


async def read_or_bury(producer: AIOKafkaProducer, record: ConsumerRecord[bytes, bytes], model: type[M], what: str,
                       *, service: str) -> M | None:
    """`record`'s value as a `model`; None once a value that does not validate is dead-lettered (UNREADABLE,
    "`what` cannot be read: " and the problems, never the value), so that its consumer moves past it."""
    try:
        return model.model_validate_json(record.value or b"")
    except ValidationError as e:
        await bury_consumed(producer, record, UNREADABLE, f"{what} cannot be read: {problems(e)}", service=service)
        return None


@dataclass
class Salvaged:
    """What could be read of an envelope that does not validate."""

    id: str | None = None
    reply_topic: str | None = None
    reply_partition: int | None = None
    attempt: int = 0
    custom_id: str | None = None

    @property
    def answerable(self) -> bool:
        return bool(self.id) and bool(self.reply_topic)


_STRUCTURE = re.compile(r'["{}\[\]]')
_SPACE = re.compile(r"\s*")
_SCALARS = json.JSONDecoder()


def _skip_space(text: str, i: int) -> int:
    match = _SPACE.match(text, i)
    return match.end() if match else i


def _skip_container(text: str, i: int) -> int:
    """The index just past the object or array starting at `i`, found by counting brackets outside strings
    (no recursion, no parsing: any depth)."""
    depth = 0
    while True:
        match = _STRUCTURE.search(text, i)
        if match is None:
            raise ValueError("unterminated container")
        c, i = match.group(), match.end()
        if c == '"':
            i = scanstring(text, i)[1]
        elif c in "{[":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return i


def top_level_scalars(text: str) -> dict[str, Any]:
    """The members of the JSON object `text` whose values are not objects or arrays (those are skipped),
    as far as it can be read: up to where it is cut short or malformed, if it is."""
    out: dict[str, Any] = {}
    with contextlib.suppress(ValueError, IndexError):
        _read_members(text, out)
    return out


def _read_members(text: str, out: dict[str, Any]) -> None:
    i = _skip_space(text, 0)
    if text[i] != "{":
        raise ValueError("not a JSON object")
    i = _skip_space(text, i + 1)
    if text[i] == "}":
        return
    while True:
        if text[i] != '"':
            raise ValueError("expected a member name")
        key, i = scanstring(text, i + 1)
        i = _skip_space(text, i)
        if text[i] != ":":
            raise ValueError("expected ':'")
        i = _skip_space(text, i + 1)
        if text[i] in "{[":
            i = _skip_container(text, i)
        else:
            out[key], i = _SCALARS.raw_decode(text, i)
        i = _skip_space(text, i)
        if text[i] == "}":
            return
        if text[i] != ",":
            raise ValueError("expected ',' or '}'")
        i = _skip_space(text, i + 1)


def salvage(raw: bytes) -> Salvaged:
    """The id, reply destination, attempt and custom_id of an envelope, as far as they can be read."""
    members: dict[str, Any]
    try:
        parsed = orjson.loads(raw)
        members = parsed if isinstance(parsed, dict) else {}
    except orjson.JSONDecodeError:  # too deep for orjson (1024 levels), cut short, or not JSON at all
        members = top_level_scalars(raw.decode(errors="replace"))

    def text(name: str) -> str | None:
        value = members.get(name)
        return value if isinstance(value, str) and value else None

    def integer(name: str) -> int | None:
        value = members.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return Salvaged(id=text("id"), reply_topic=text("reply_topic"), reply_partition=integer("reply_partition"),
                    attempt=max(0, integer("attempt") or 0), custom_id=text("custom_id"))


def _dead_reason(message: str) -> DeliveryRefused:
    return DeliveryRefused(UNREADABLE, message, status=400, topic=topics.REQUESTS, partition=None)


async def refuse_unreadable(producer: AIOKafkaProducer, value: bytes, error: ValidationError, *, service: str,
                            key: bytes | None = None, headers: Headers | None = None) -> Any:
    """Answer an envelope that does not validate with a 400 on its reply topic, or (no id, or no reply topic
    that exists) dead-letter it with the reason; returns once that is acknowledged."""
    message = f"The request envelope cannot be read: {problems(error)}."
    found = salvage(value)
    if found.answerable:
        env = RequestEnvelope.model_construct(id=found.id, reply_topic=found.reply_topic,
                                              reply_partition=found.reply_partition, attempt=found.attempt,
                                              custom_id=found.custom_id)
        try:
            await check_destination(producer, env.reply_topic, env.reply_partition)
        except DeliveryRefused as refused:
            message += f" It cannot be answered either: {refused.message}."
        else:
            log.error("answering an unreadable envelope", extra={"request_id": env.id, "error": message})
            err = GatewayError(400, message, code="invalid_envelope")
            return await answer(producer, env, err, service=service)
    return await bury(producer, _dead_reason(message), value, key=key, service=service, request_id=found.id,
                      headers=headers, replay_to=(topics.REQUESTS, None))
