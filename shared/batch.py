"""The batch line format, shared by both ways of running a batch: the Batches API (ingress,
services/ingress/batch_driver.py) and `switchyard batch run` (switchyard/batch.py, straight through Kafka).

Input lines are OpenAI batch lines (`custom_id`, `method`, `url`, `body`); each becomes a request envelope with
`priority: batch` and its own reply topic, and each answer becomes one line in OpenAI's batch output format. An
answer sent in parts (too large for one message, shared/parts.py) is joined before it is written.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from pydantic import ValidationError

from switchyard.shared.contracts import Reply, RequestEnvelope
from switchyard.shared.errors import GatewayError, redact_message
from switchyard.shared.parts import Assembler

BATCH_STAGES = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
"""The stages of a batch of the Batches API; each has a `<stage>_at` column (shared/db.py): when the batch
entered it."""

log = logging.getLogger("switchyard.batch")
URL_KINDS = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings"}
"""The endpoints a batch line of `switchyard batch run` may name, and the envelope kind each becomes. The
Batches API also takes `/v1/responses` (it translates those lines to chat and their answers back)."""


class LineError(ValueError):
    """A bad input line: its number, a stable `code` and the offending `param`; str() is `line N: reason`."""

    def __init__(self, number: int, reason: str, code: str = "invalid_line", param: str | None = None) -> None:
        reason = redact_message(reason)  # it may quote the line (a model name, a custom_id): error text is redacted
        super().__init__(f"line {number}: {reason}")
        self.number, self.reason, self.code, self.param = number, reason, code, param


def parse_line(number: int, line: str | bytes, endpoint: str | None = None,
               kinds: dict[str, str] = URL_KINDS) -> tuple[str, str, dict[str, Any]]:
    """(custom_id, kind, body) of one input line, or LineError saying what is wrong with it.

    With `endpoint` (the Batches API), each line must name that url and `method: POST`, as OpenAI requires;
    without it (`switchyard batch run`), the url defaults to chat completions and any method is accepted.
    `kinds` maps the urls a line may name to what they become (the Batches API adds `/v1/responses`).
    """
    try:
        item = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise LineError(number, f"not valid JSON ({e})", "invalid_json") from None
    if not isinstance(item, dict):
        raise LineError(number, "expected a JSON object", "invalid_json")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError(number, "missing custom_id", "missing_custom_id", "custom_id")
    if endpoint is not None and item.get("method") != "POST":
        raise LineError(number, "method must be POST", "invalid_method", "method")
    url = item.get("url", "/v1/chat/completions" if endpoint is None else None)
    if endpoint is not None and url != endpoint:
        raise LineError(number, f"url must be the batch's endpoint {endpoint}", "mismatched_endpoint", "url")
    if url not in kinds:
        raise LineError(number, f"url must be one of {', '.join(kinds)}", "invalid_url", "url")
    body = item.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise LineError(number, "body must be an object with a model", "invalid_body", "body")
    if endpoint is not None and body.get("stream"):
        raise LineError(number, "a batch line cannot stream", "invalid_body", "body.stream")
    return custom_id, kinds[url], {**body, "stream": False}


def result_line(custom_id: str, request_id: str, status: int, body: Any) -> bytes:
    """One line of a batch's output (or error) file, in OpenAI's batch output shape."""
    return orjson.dumps({"id": f"batch_req_{request_id}", "custom_id": custom_id,
                         "response": {"status_code": status, "request_id": request_id, "body": body},
                         "error": None}) + b"\n"


def unanswered_line(custom_id: str, request_id: str, code: str, message: str) -> bytes:
    """The error-file line of a request that never ran (`batch_expired`, `batch_cancelled`): no response."""
    return orjson.dumps({"id": f"batch_req_{request_id}", "custom_id": custom_id, "response": None,
                         "error": {"code": code, "message": message}}) + b"\n"


def envelope_for(request_id: str, custom_id: str, kind: str, body: dict[str, Any], reply_topic: str,
                 deadline_ms: int, key_id: str | None, metadata: dict[str, str] | None = None,
                 guardrails: list[str] | None = None) -> RequestEnvelope:
    """The request envelope of one batch line: batch priority (paced behind interactive traffic by the
    workers), its own reply topic (partition 0), and the batch's deadline; `guardrails`: those the batch's
    key names (the worker applies their output stage, as for the key's interactive requests)."""
    return RequestEnvelope(id=request_id, kind=kind, model=body["model"], body=body,  # type: ignore[arg-type]
                           reply_topic=reply_topic, reply_partition=0, priority="batch", custom_id=custom_id,
                           deadline_ms=deadline_ms, key_id=key_id, metadata=metadata or {},
                           guardrails=guardrails or [])


def terminal(raw: bytes | None, assembler: Assembler) -> Reply | None:
    """The reply a batch reader keeps from one reply-topic record: a final `response` (with its parts joined,
    shared/parts.py) or `error`; None for anything else: a part (held until its response), the job's own
    marker, a record that is no reply (logged)."""
    reply = _readable(raw, assembler)
    return reply if reply is not None and reply.type in ("response", "error") else None


def _readable(value: bytes | None, assembler: Assembler) -> Reply | None:
    """The reply a record carries, with a response sent in parts joined (None until it is whole); a record
    that is no reply is skipped (logged), and parts that do not join become a 502 for their request."""
    try:
        return assembler.offer(Reply.model_validate_json(value or b""))
    except ValidationError as e:
        log.error("skipping a record on the reply topic that is not a reply",
                  extra={"error": "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())})
        return None
    except ValueError as e:  # parts that do not join: answer the request with an error, not silence
        reply = Reply.model_validate_json(value or b"")
        err = GatewayError(502, f"The answer to this request arrived incomplete ({e}).", type="api_error",
                           code="reply_incomplete")
        return Reply(id=reply.id, type="error", status=err.status, data=err.body(), custom_id=reply.custom_id)


