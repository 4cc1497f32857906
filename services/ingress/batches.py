"""The Batches API on ingress: `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches` (`after`, `limit`),
`POST /v1/batches/{id}/cancel`, in OpenAI's shapes.

These routes only read and write the `batches` table: running a batch (validating its file, sending its lines
through `llm.requests`, collecting results, writing the output files) is the batch driver's job
(batch_driver.py), which any ingress replica can take over from PostgreSQL.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from switchyard.services.ingress.admin import needs_database
from switchyard.services.ingress.batch_validation import ENDPOINTS
from switchyard.services.ingress.file_store import OWNED, Owner, get_file
from switchyard.services.ingress.files import not_found, owner_of
from switchyard.services.ingress.openapi import json_body
from switchyard.services.ingress.responses import json_response
from switchyard.services.ingress.validation import read_json, validate
from switchyard.shared import pg
from switchyard.shared.batch import BATCH_STAGES
from switchyard.shared.errors import GatewayError

if TYPE_CHECKING:
    from switchyard.services.ingress.app import Gateway

UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
MAX_WINDOW = timedelta(days=7)
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smh])$")

_COLUMNS = ("id", "key_id", "team", "key_metadata", "endpoint", "input_file_id", "completion_window", "status",
            "metadata", "total", "completed", "failed", "created_at", "expires_at", "reply_offset", "driver",
            "lease_until")
_INSERT = pg.Query(f"INSERT INTO batches ({', '.join(_COLUMNS)})"
                   f" VALUES ({', '.join(f':{column}' for column in _COLUMNS)}) RETURNING *")
_GET = pg.Query(f"SELECT * FROM batches WHERE id = :id AND {OWNED}")
_ANCHOR = pg.Query("SELECT created_at, id FROM batches WHERE id = :id")
_LIST = pg.Query(
    f"SELECT * FROM batches WHERE {OWNED} AND (CAST(:after_at AS timestamptz) IS NULL"
    " OR (created_at, id) < (CAST(:after_at AS timestamptz), CAST(:after_id AS text)))"
    " ORDER BY created_at DESC, id DESC LIMIT :limit")
_CANCEL = pg.Query(
    "UPDATE batches SET status = 'cancelling', cancelling_at = now()"
    f" WHERE id = :id AND {OWNED} AND status IN ('validating', 'in_progress') RETURNING *")


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=200)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(default=None, max_length=16)


def window(value: str) -> timedelta:
    """`24h` (OpenAI's only window), or any other `<n>s|m|h` up to 7 days: a self-hosted gateway may want less."""
    match = _WINDOW.match(value)
    if not match:
        raise GatewayError(400, "completion_window must be like '24h' (also '<n>m' or '<n>s').",
                           param="completion_window", code="invalid_completion_window")
    delta = timedelta(seconds=int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]])
    if delta > MAX_WINDOW:
        raise GatewayError(400, "completion_window may be at most 7 days.", param="completion_window",
                           code="invalid_completion_window")
    return delta


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


def batch_object(row: pg.Record) -> dict[str, Any]:
    """A `batches` row as OpenAI's Batch object."""
    return {"id": row["id"], "object": "batch", "endpoint": row["endpoint"], "errors": row["errors"],
            "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
            "status": row["status"], "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
            "created_at": _ts(row["created_at"]), "expires_at": _ts(row["expires_at"]),
            **{f"{stage}_at": _ts(row[f"{stage}_at"]) for stage in BATCH_STAGES},
            "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
            "metadata": row["metadata"]}


async def _get(gateway: Gateway, batch_id: str, owner: Owner) -> pg.Record:
    row = await gateway.database().fetchrow(_GET, {"id": batch_id, **owner.params()})
    if row is None:
        raise not_found("Batch", batch_id, "batch_id")
    return row


def add_batch_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.post("/v1/batches", openapi_extra=json_body(BatchCreate))
    @needs_database
    async def create_batch(request: Request) -> Response:
        identity = await gateway.authenticate(request)
        spec = validate(BatchCreate, await read_json(request))
        assert isinstance(spec, BatchCreate)
        if spec.endpoint not in ENDPOINTS:
            raise GatewayError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}.", param="endpoint",
                               code="invalid_endpoint")
        expires = window(spec.completion_window)
        owner = owner_of(identity)
        file = await get_file(gateway.database(), spec.input_file_id, owner)
        if file is None:
            raise not_found("File", spec.input_file_id, "input_file_id")
        if file["purpose"] != "batch":
            raise GatewayError(400, f"File {file['id']} has purpose {file['purpose']!r}, not 'batch'.",
                               param="input_file_id", code="invalid_file_purpose")
        now = datetime.now(UTC)
        driver = gateway.batch_driver
        values = {"id": f"batch_{uuid.uuid4().hex}", "key_id": identity.key_id, "team": identity.metadata.get("team"),
                  "key_metadata": identity.metadata, "endpoint": spec.endpoint, "input_file_id": file["id"],
                  "completion_window": spec.completion_window, "status": "validating", "metadata": spec.metadata,
                  "total": 0, "completed": 0, "failed": 0, "created_at": now, "expires_at": now + expires,
                  "reply_offset": 0,
                  # The replica that accepted it drives it at once; the lease lets another take over if it dies.
                  "driver": driver.me if driver else None, "lease_until": now + driver.lease if driver else None}
        row = await gateway.database().fetchrow(_INSERT, values)
        assert row is not None
        if driver:
            driver.wake()
        return json_response(batch_object(row))

    @app.get("/v1/batches/{batch_id}")
    @needs_database
    async def retrieve_batch(request: Request, batch_id: str) -> Response:
        identity = await gateway.authenticate(request)
        return json_response(batch_object(await _get(gateway, batch_id, owner_of(identity))))

    @app.get("/v1/batches")
    @needs_database
    async def list_batches(request: Request, after: str | None = None,
                           limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Response:
        identity = await gateway.authenticate(request)
        owner = owner_of(identity)
        async with gateway.database().connection() as conn:
            anchor = await conn.fetchrow(_ANCHOR, {"id": after}) if after else None
            rows = await conn.fetch(_LIST, {
                **owner.params(), "limit": limit + 1, "after_at": anchor["created_at"] if anchor else None,
                "after_id": anchor["id"] if anchor else None})
        data = [batch_object(r) for r in rows[:limit]]
        return json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit})

    @app.post("/v1/batches/{batch_id}/cancel")
    @needs_database
    async def cancel_batch(request: Request, batch_id: str) -> Response:
        """`cancelling` now; the driver stops sending lines, waits for those in flight, then `cancelled`."""
        identity = await gateway.authenticate(request)
        owner = owner_of(identity)
        row = await gateway.database().fetchrow(_CANCEL, {"id": batch_id, **owner.params()})
        if row is None:
            row = await _get(gateway, batch_id, owner)
            if row["status"] not in ("cancelling", "cancelled"):
                raise GatewayError(409, f"Cannot cancel a batch with status '{row['status']}'.", param="batch_id",
                                   code="batch_not_cancellable")
        if gateway.batch_driver:
            gateway.batch_driver.wake()
        return json_response(batch_object(row))
