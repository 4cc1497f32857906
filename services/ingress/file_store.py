"""The file store of the Files API: PostgreSQL rows of at most CHUNK_BYTES each, shared by every ingress replica.

A file is one `files` row and its `file_chunks` (bytea, in order by `seq`). An upload is written in one
transaction as it streams in, so a file is visible whole or not at all (a replica that dies mid-upload leaves
nothing behind), and no process ever holds more than about one chunk of it in memory: uploads are parsed from
the request stream as they arrive, downloads and readers fetch one chunk at a time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from switchyard.shared.db import file_chunks, files

CHUNK_BYTES = 1 << 20
"""The size of one stored chunk (the last one of a file may be shorter)."""


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def file_object(row: Any) -> dict[str, Any]:
    """A `files` row as OpenAI's File object."""
    return {"id": row.id, "object": "file", "bytes": int(row.bytes), "created_at": int(row.created_at.timestamp()),
            "expires_at": int(row.expires_at.timestamp()) if row.expires_at else None, "filename": row.filename,
            "purpose": row.purpose, "status": "processed", "status_details": None}


@dataclass
class Owner:
    """Who may see a file or batch: the key that made it, its team, or the master key (`key_id is None`)."""

    key_id: str | None
    team: str | None

    def clause(self, table: Any) -> Any:
        if self.key_id is None:
            return True
        if self.team:
            return (table.c.key_id == self.key_id) | (table.c.team == self.team)
        return table.c.key_id == self.key_id


class FileWriter:
    """Writes one file inside the caller's transaction: `write` buffers up to CHUNK_BYTES, then stores a chunk."""

    def __init__(self, conn: AsyncConnection, file_id: str, owner_key: str, team: str | None, purpose: str,
                 filename: str) -> None:
        self.conn, self.file_id = conn, file_id
        self.row = {"id": file_id, "key_id": owner_key, "team": team, "filename": filename, "purpose": purpose,
                    "bytes": 0, "created_at": datetime.now(UTC)}
        self.buffer = bytearray()
        self.size = 0
        self.seq = 0
        self.started = False

    async def _start(self) -> None:
        if not self.started:
            self.started = True
            await self.conn.execute(insert(files).values(**self.row))

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes; stores every full chunk now, so at most one chunk stays buffered."""
        self.buffer += data
        self.size += len(data)
        while len(self.buffer) >= CHUNK_BYTES:
            await self._store(bytes(self.buffer[:CHUNK_BYTES]))
            del self.buffer[:CHUNK_BYTES]

    async def _store(self, data: bytes) -> None:
        await self._start()
        await self.conn.execute(insert(file_chunks).values(file_id=self.file_id, seq=self.seq, data=data))
        self.seq += 1

    async def close(self, purpose: str | None = None, filename: str | None = None) -> dict[str, Any]:
        """Store what is buffered and the file's size; returns the File object (visible when the caller commits)."""
        await self._start()
        if self.buffer:
            await self._store(bytes(self.buffer))
            self.buffer.clear()
        values: dict[str, Any] = {"bytes": self.size}
        if purpose is not None:
            values["purpose"] = purpose
        if filename is not None:
            values["filename"] = filename
        await self.conn.execute(update(files).where(files.c.id == self.file_id).values(**values))
        self.row.update(values)
        return file_object(_Row(self.row))


class _Row:
    def __init__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(data)
        self.expires_at = data.get("expires_at")


async def get_file(engine: AsyncEngine, file_id: str, owner: Owner) -> Any | None:
    async with engine.connect() as conn:
        return (await conn.execute(select(files).where(files.c.id == file_id, owner.clause(files)))).first()


async def list_files(engine: AsyncEngine, owner: Owner, purpose: str | None, limit: int, after: str | None,
                     ascending: bool) -> tuple[list[Any], bool]:
    """A page of files, newest first unless `ascending`; `after` is the id of the last file of the previous page."""
    query = select(files).where(owner.clause(files))
    if purpose:
        query = query.where(files.c.purpose == purpose)
    async with engine.connect() as conn:
        if after:
            anchor = (await conn.execute(select(files.c.created_at, files.c.id).where(files.c.id == after))).first()
            if anchor is not None:
                key = func.row(files.c.created_at, files.c.id)
                mark = func.row(anchor.created_at, anchor.id)
                query = query.where(key > mark if ascending else key < mark)
        order = (files.c.created_at.asc(), files.c.id.asc()) if ascending else (files.c.created_at.desc(),
                                                                              files.c.id.desc())
        rows = list((await conn.execute(query.order_by(*order).limit(limit + 1))).all())
    return rows[:limit], len(rows) > limit


async def delete_file(engine: AsyncEngine, file_id: str, owner: Owner) -> bool:
    async with engine.begin() as conn:
        result = await conn.execute(delete(files).where(files.c.id == file_id, owner.clause(files)))
    return bool(result.rowcount)


async def chunks(engine: AsyncEngine, file_id: str) -> AsyncIterator[bytes]:
    """The file's bytes, one stored chunk at a time (one short query each: no connection held between them)."""
    seq = 0
    while True:
        async with engine.connect() as conn:
            data = (await conn.execute(select(file_chunks.c.data).where(
                file_chunks.c.file_id == file_id, file_chunks.c.seq == seq))).scalar()
        if data is None:
            return
        yield bytes(data)
        seq += 1


async def lines(engine: AsyncEngine, file_id: str, max_line_bytes: int) -> AsyncIterator[tuple[int, bytes | None]]:
    """(line number from 1, line) for every non-empty line of a file; a line longer than `max_line_bytes` is
    yielded as None (and skipped), so a hostile file cannot make a reader buffer it whole."""
    number, pending, too_long = 0, bytearray(), False
    async for chunk in chunks(engine, file_id):
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if not too_long:
                    pending += chunk[start:]
                    if len(pending) > max_line_bytes:
                        too_long, pending = True, bytearray()
                break
            number += 1
            if too_long:
                yield number, None
            else:
                pending += chunk[start:end]
                line = bytes(pending).strip()
                if len(line) > max_line_bytes:
                    yield number, None
                elif line:
                    yield number, line
            pending, too_long = bytearray(), False
            start = end + 1
    if too_long:
        yield number + 1, None
    elif bytes(pending).strip():
        yield number + 1, bytes(pending).strip()


def now_s() -> int:
    return int(time.time())
