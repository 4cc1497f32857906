"""The Files API on ingress: `POST /v1/files` (multipart, streamed), `GET /v1/files`, `GET /v1/files/{id}`,
`GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`.

Uploads are parsed from the request stream as the bytes arrive (python-multipart's push parser) and written
to the shared store (file_store.py) a chunk at a time: a 100 MB upload never sits whole in memory, nor on
local disk. Files are visible to the key that uploaded them, to its team, and to the master key.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response, StreamingResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from switchyard.services.ingress.admin import needs_database
from switchyard.services.ingress.auth import Identity
from switchyard.services.ingress.file_store import (
    FileWriter,
    Owner,
    chunks,
    delete_file,
    file_object,
    get_file,
    list_files,
    new_file_id,
)
from switchyard.services.ingress.responses import json_response
from switchyard.shared.errors import GatewayError

if TYPE_CHECKING:
    from switchyard.services.ingress.app import Gateway

MAX_FILE_BYTES = int(os.environ.get("SWITCHYARD_MAX_FILE_BYTES", str(200 * 1000 * 1000)))
"""The largest upload accepted (OpenAI's limit for a batch input file, 200 MB)."""
PURPOSES = ("batch",)
"""Purposes an upload may have; `batch_output` is given to the result files batches write."""
MAX_FIELD_BYTES = 4096
"""The most bytes of a form field other than the file (`purpose`): a hostile form cannot grow it."""

UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["batch"]}},
}}}}}


def owner_of(identity: Identity) -> Owner:
    """What `identity` may see: everything (master key), else its own key's and its team's objects."""
    return Owner(None if identity.is_master else identity.key_id, identity.metadata.get("team"))


def not_found(kind: str, object_id: str, param: str) -> GatewayError:
    return GatewayError(404, f"No such {kind} object: {object_id}", type="invalid_request_error", param=param,
                        code=f"{kind.lower()}_not_found")


def _boundary(request: Request) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise GatewayError(400, "Uploads must be multipart/form-data with a `file` and a `purpose` field.",
                           code="invalid_content_type")
    return boundary


class _Parts:
    """Collects the push parser's events for one network chunk; the upload applies them (awaiting the store)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self._field, self._value = bytearray(), bytearray()
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict[str, Any]:
        def header_field(data: bytes, start: int, end: int) -> None:
            self._field += data[start:end]

        def header_value(data: bytes, start: int, end: int) -> None:
            self._value += data[start:end]

        def header_end() -> None:
            self._headers[bytes(self._field).lower()] = bytes(self._value)
            self._field, self._value = bytearray(), bytearray()

        def headers_finished() -> None:
            _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
            self.events.append(("begin", params))
            self._headers = {}

        def part_data(data: bytes, start: int, end: int) -> None:
            self.events.append(("data", data[start:end]))

        def part_end() -> None:
            self.events.append(("end", None))

        return {"on_header_field": header_field, "on_header_value": header_value, "on_header_end": header_end,
                "on_headers_finished": headers_finished, "on_part_data": part_data, "on_part_end": part_end}


async def upload(gateway: Gateway, request: Request, identity: Identity) -> dict[str, Any]:
    """Stream a multipart upload into the store; returns the File object once committed."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_FILE_BYTES + 64 * 1024:
        raise _too_large()
    parts = _Parts()
    try:
        parser = MultipartParser(_boundary(request), parts.callbacks())  # type: ignore[arg-type]
    except FormParserError as e:
        raise GatewayError(400, f"The multipart body is malformed ({e}).", code="invalid_multipart") from None
    fields: dict[str, bytearray] = {}
    filename: str | None = None
    async with gateway.database().transaction() as conn:
        writer = FileWriter(conn, new_file_id(), identity.key_id, identity.metadata.get("team"), "batch", "upload")
        current: str | None = None  # "file", a field name, or None (a part to skip)
        async for data in request.stream():
            try:
                parser.write(data)
            except FormParserError as e:
                raise GatewayError(400, f"The multipart body is malformed ({e}).", code="invalid_multipart") from None
            events, parts.events = parts.events, []
            for kind, value in events:
                if kind == "begin":
                    name = (value.get(b"name") or b"").decode("utf-8", "replace")
                    if name == "file" and b"filename" in value:
                        if filename is not None:
                            raise GatewayError(400, "Upload one file at a time.", param="file",
                                               code="too_many_files")
                        filename = value[b"filename"].decode("utf-8", "replace")[:255] or "upload"
                        current = "file"
                    else:
                        current = name if len(fields) < 16 else None
                        if current is not None:
                            fields[current] = bytearray()
                elif kind == "data" and current == "file":
                    if writer.size + len(value) > MAX_FILE_BYTES:
                        raise _too_large()
                    await writer.write(value)
                elif kind == "data" and current is not None:
                    fields[current] += value
                    if len(fields[current]) > MAX_FIELD_BYTES:
                        raise GatewayError(400, f"The form field {current!r} is too long.", param=current)
                elif kind == "end":
                    current = None
        try:
            parser.finalize()
        except FormParserError as e:
            raise GatewayError(400, f"The multipart body is malformed ({e}).", code="invalid_multipart") from None
        purpose = bytes(fields.get("purpose", b"")).decode("utf-8", "replace").strip()
        if not purpose:
            raise GatewayError(400, "Missing required parameter: 'purpose'.", param="purpose",
                               code="missing_required_parameter")
        if purpose not in PURPOSES:
            raise GatewayError(400, f"Invalid purpose {purpose[:50]!r}: this gateway stores files for "
                               f"{', '.join(PURPOSES)} only.", param="purpose", code="invalid_purpose")
        if filename is None:
            raise GatewayError(400, "Missing required parameter: 'file'.", param="file",
                               code="missing_required_parameter")
        return await writer.close(purpose, filename)


def _too_large() -> GatewayError:
    return GatewayError(413, f"The file is too large (limit {MAX_FILE_BYTES} bytes).", param="file",
                        code="file_too_large")


def add_file_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.post("/v1/files", openapi_extra=UPLOAD_SCHEMA)
    @needs_database
    async def create_file(request: Request) -> Response:
        identity = await gateway.authenticate(request)
        return json_response(await upload(gateway, request, identity))

    @app.get("/v1/files")
    @needs_database
    async def list_files_route(request: Request, purpose: str | None = None,
                               limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
                               order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
                               after: str | None = None) -> Response:
        identity = await gateway.authenticate(request)
        rows, more = await list_files(gateway.database(), owner_of(identity), purpose, limit, after, order == "asc")
        data = [file_object(r) for r in rows]
        return json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None, "has_more": more})

    @app.get("/v1/files/{file_id}")
    @needs_database
    async def retrieve_file(request: Request, file_id: str) -> Response:
        identity = await gateway.authenticate(request)
        row = await get_file(gateway.database(), file_id, owner_of(identity))
        if row is None:
            raise not_found("File", file_id, "file_id")
        return json_response(file_object(row))

    @app.delete("/v1/files/{file_id}")
    @needs_database
    async def delete_file_route(request: Request, file_id: str) -> Response:
        identity = await gateway.authenticate(request)
        if not await delete_file(gateway.database(), file_id, owner_of(identity)):
            raise not_found("File", file_id, "file_id")
        return json_response({"id": file_id, "object": "file", "deleted": True})

    @app.get("/v1/files/{file_id}/content")
    @needs_database
    async def file_content(request: Request, file_id: str) -> Response:
        identity = await gateway.authenticate(request)
        db = gateway.database()
        row = await get_file(db, file_id, owner_of(identity))
        if row is None:
            raise not_found("File", file_id, "file_id")

        async def body() -> AsyncIterator[bytes]:
            async for chunk in chunks(db, file_id):
                yield chunk

        return StreamingResponse(body(), media_type="application/octet-stream",
                                 headers={"content-length": str(row["bytes"]),
                                          "content-disposition": f'attachment; filename="{file_id}.jsonl"'})
