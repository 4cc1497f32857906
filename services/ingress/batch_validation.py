"""Checking a batch's input file before any of its lines runs, and storing the lines that pass.

Every line gets the checks the same body sent over HTTP gets (JSON, `custom_id` unique in the file, method, url,
body, a model of this config that the batch's key may use), and OpenAI's limits (MAX_LINES, each line at most
MAX_BODY_BYTES). The lines are stored only when every one passed: a batch runs whole or not at all, and a
failed one lists the line numbers of what is wrong (the first MAX_LISTED_ERRORS).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel

from switchyard.services.ingress.file_store import lines
from switchyard.services.ingress.responses_api import to_chat_request
from switchyard.services.ingress.validation import MAX_BODY_BYTES, ChatCompletionRequest, EmbeddingsRequest
from switchyard.services.ingress.validation import validate as validate_body
from switchyard.shared.batch import URL_KINDS, LineError, parse_line
from switchyard.shared.errors import GatewayError
from switchyard.shared.pg import Connection, Database, Query

if TYPE_CHECKING:
    from switchyard.services.ingress.app import Gateway

MAX_LINES = 50_000
"""OpenAI's limit of requests per batch."""
MAX_LISTED_ERRORS = 100
INSERT_ROWS = 500
BODY_MODELS: dict[str, type[BaseModel]] = {"chat": ChatCompletionRequest, "embeddings": EmbeddingsRequest}
RESPONSES = "responses"
ENDPOINTS = {**URL_KINDS, "/v1/responses": RESPONSES}
"""The endpoints a batch may name. A `/v1/responses` line runs as chat (translated when it is sent) and its
answer is translated back to a response object when it is stored, as `POST /v1/responses` does."""

_DELETE_LINES = Query("DELETE FROM batch_lines WHERE batch_id = :batch_id")
_FILE_EXISTS = Query("SELECT id FROM files WHERE id = :id")
_INSERT_LINE = Query("INSERT INTO batch_lines (batch_id, line, custom_id, model, body, submitted, status)"
                     " VALUES (:batch_id, :line, :custom_id, :model, :body, :submitted, :status)")


async def store_lines(conn: Connection, db: Database, gateway: Gateway, batch: Any,
                      batch_id: str) -> tuple[int, list[dict[str, Any]]]:
    """Check every line of `batch`'s input file and, when all pass, store them as pending in `conn`'s transaction
    (none stored otherwise); returns the number of lines read and the errors found (empty when all passed).
    The file is read through `db`, a chunk at a time, on connections of its own."""
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    keys = gateway.keys
    record = keys.by_id.get(batch.key_id) if keys is not None else None
    identity = record.identity() if record is not None else None
    total = 0
    rows: list[dict[str, Any]] = []

    def fail(number: int | None, code: str, message: str, param: str | None = None) -> None:
        errors.append({"code": code, "message": message, "param": param, "line": number})

    await conn.execute(_DELETE_LINES, {"batch_id": batch_id})
    exists = await conn.fetchrow(_FILE_EXISTS, {"id": batch.input_file_id})
    if exists is None:
        fail(None, "invalid_file", f"The input file {batch.input_file_id} no longer exists.",
             "input_file_id")
    else:
        async for number, raw in lines(db, batch.input_file_id, MAX_BODY_BYTES):
            total += 1
            if total > MAX_LINES:
                fail(number, "too_many_lines", f"A batch may have at most {MAX_LINES} lines.")
                break
            if raw is None:
                fail(number, "line_too_large", f"The line is longer than {MAX_BODY_BYTES} bytes.")
                continue
            try:
                custom_id, line_kind, body = parse_line(number, raw, batch.endpoint, ENDPOINTS)
                if custom_id in seen:
                    raise LineError(number, f"duplicate custom_id {custom_id[:100]!r}",
                                    "duplicate_custom_id", "custom_id")
                seen.add(custom_id)
                check_body(gateway, number, line_kind, body, identity)
            except LineError as e:
                if len(errors) < MAX_LISTED_ERRORS:
                    fail(e.number, e.code, e.reason, e.param)
                continue
            if not errors:
                rows.append({"batch_id": batch_id, "line": number, "custom_id": custom_id,
                             "model": body["model"], "body": orjson.dumps(body), "submitted": False,
                             "status": "pending"})
                if len(rows) >= INSERT_ROWS:
                    await conn.executemany(_INSERT_LINE, rows)
                    rows = []
        if total == 0 and not errors:
            fail(None, "empty_file", "The input file has no lines.")
    if errors:
        await conn.execute(_DELETE_LINES, {"batch_id": batch_id})
    elif rows:
        await conn.executemany(_INSERT_LINE, rows)
    return total, errors


def check_body(gateway: Gateway, number: int, kind: str, body: dict[str, Any], identity: Any) -> None:
    """What ingress checks of the same body sent over HTTP, as a LineError."""
    try:
        if kind == RESPONSES:
            kind, body = "chat", to_chat_request(body)
        validate_body(BODY_MODELS[kind], body)
    except GatewayError as e:
        raise LineError(number, e.message, "invalid_body", f"body.{e.param}" if e.param else "body") from None
    model = body["model"]
    if gateway.config.group(model) is None:
        raise LineError(number, f"The model '{model}' does not exist.", "model_not_found", "body.model")
    if identity is not None and not identity.may_use(model):
        raise LineError(number, f"This key may not use the model '{model}'.", "model_not_allowed", "body.model")
