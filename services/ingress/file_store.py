"""The file store of the Files API: PostgreSQL rows of at most CHUNK_BYTES each, shared by every ingress replica.

A file is one `files` row and its `file_chunks` (bytea, in order by `seq`). An upload is written in one
transaction as it streams in, so a file is visible whole or not at all (a replica that dies mid-upload leaves
nothing behind), and no process ever holds more than about one chunk of it in memory: uploads are parsed from
the request stream as they arrive, downloads and readers fetch one chunk at a time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from switchyard.shared.pg import Connection, Database, Query, Record

CHUNK_BYTES = 1 << 20
"""The size of one stored chunk (the last one of a file may be shorter)."""

OWNED = "(CAST(:owner_key AS text) IS NULL OR key_id = :owner_key OR team = :owner_team)"
"""The rows of a `files` or `batches` query an `Owner` may see (its `params()` fill it in)."""

_INSERT_FILE = Query("INSERT INTO files (id, key_id, team, filename, purpose, bytes, created_at)"
                     " VALUES (:id, :key_id, :team, :filename, :purpose, :bytes, :created_at)")
_INSERT_CHUNK = Query("INSERT INTO file_chunks (file_id, seq, data) VALUES (:file_id, :seq, :data)")
_CLOSE_FILE = Query("UPDATE files SET bytes = :bytes, purpose = :purpose, filename = :filename WHERE id = :id")
_GET_FILE = Query(f"SELECT * FROM files WHERE id = :id AND {OWNED}")
_ANCHOR = Query("SELECT created_at, id FROM files WHERE id = :id")
_LIST_FILES = {ascending: Query(
    f"SELECT * FROM files WHERE {OWNED} AND (CAST(:purpose AS text) IS NULL OR purpose = :purpose)"
    " AND (CAST(:after_at AS timestamptz) IS NULL"
    f" OR (created_at, id) {'>' if ascending else '<'} (CAST(:after_at AS timestamptz), CAST(:after_id AS text)))"
    f" ORDER BY created_at {'ASC' if ascending else 'DESC'}, id {'ASC' if ascending else 'DESC'} LIMIT :limit")
    for ascending in (True, False)}
_DELETE_FILE = Query(f"DELETE FROM files WHERE id = :id AND {OWNED}")
_CHUNK = Query("SELECT data FROM file_chunks WHERE file_id = :file_id AND seq = :seq")


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def file_object(row: Record | Mapping[str, Any]) -> dict[str, Any]:
    """A `files` row as OpenAI's File object."""
    expires_at = row["expires_at"]
    return {"id": row["id"], "object": "file", "bytes": int(row["bytes"]),
            "created_at": int(row["created_at"].timestamp()),
            "expires_at": int(expires_at.timestamp()) if expires_at else None, "filename": row["filename"],
            "purpose": row["purpose"], "status": "processed", "status_details": None}


@dataclass
class Owner:
    """Who may see a file or batch: the key that made it, its team, or the master key (`key_id is None`)."""

    key_id: str | None
    team: str | None

    def params(self) -> dict[str, Any]:
        """The parameters of OWNED: every row for the master key, else the key's own and its team's."""
        return {"owner_key": self.key_id, "owner_team": self.team or None}


class FileWriter:
    """Writes one file inside the caller's transaction: `write` buffers up to CHUNK_BYTES, then stores a chunk."""

    def __init__(self, conn: Connection, file_id: str, owner_key: str, team: str | None, purpose: str,
                 filename: str) -> None:
        self.conn, self.file_id = conn, file_id
        self.row: dict[str, Any] = {"id": file_id, "key_id": owner_key, "team": team, "filename": filename,
                                    "purpose": purpose, "bytes": 0, "created_at": datetime.now(UTC),
                                    "expires_at": None}
        self.buffer = bytearray()
        self.size = 0
        self.seq = 0
        self.started = False

    async def _start(self) -> None:
        if not self.started:
            self.started = True
            await self.conn.execute(_INSERT_FILE, self.row)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes; stores every full chunk now, so at most one chunk stays buffered."""
        self.buffer += data
        self.size += len(data)
        while len(self.buffer) >= CHUNK_BYTES:
            await self._store(bytes(self.buffer[:CHUNK_BYTES]))
            del self.buffer[:CHUNK_BYTES]

    async def _store(self, data: bytes) -> None:
        await self._start()
        await self.conn.execute(_INSERT_CHUNK, {"file_id": self.file_id, "seq": self.seq, "data": data})
        self.seq += 1

    async def close(self, purpose: str | None = None, filename: str | None = None) -> dict[str, Any]:
        """Store what is buffered and the file's size; returns the File object (visible when the caller commits)."""
        await self._start()
        if self.buffer:
            await self._store(bytes(self.buffer))
            self.buffer.clear()
        self.row["bytes"] = self.size
        if purpose is not None:
            self.row["purpose"] = purpose
        if filename is not None:
            self.row["filename"] = filename
        await self.conn.execute(_CLOSE_FILE, self.row)
        return file_object(self.row)


async def get_file(db: Database, file_id: str, owner: Owner) -> Record | None:
    return await db.fetchrow(_GET_FILE, {"id": file_id, **owner.params()})


async def list_files(db: Database, owner: Owner, purpose: str | None, limit: int, after: str | None,
                     ascending: bool) -> tuple[list[Record], bool]:
    """A page of files, newest first unless `ascending`; `after` is the id of the last file of the previous page."""
    async with db.connection() as conn:
        anchor = await conn.fetchrow(_ANCHOR, {"id": after}) if after else None
        rows = await conn.fetch(_LIST_FILES[ascending], {
            **owner.params(), "purpose": purpose or None, "limit": limit + 1,
            "after_at": anchor["created_at"] if anchor else None, "after_id": anchor["id"] if anchor else None})
    return rows[:limit], len(rows) > limit


async def delete_file(db: Database, file_id: str, owner: Owner) -> bool:
    return bool(await db.execute(_DELETE_FILE, {"id": file_id, **owner.params()}))


async def chunks(db: Database, file_id: str) -> AsyncIterator[bytes]:
    """The file's bytes, one stored chunk at a time (one short query each: no connection held between them)."""
    seq = 0
    while True:
        data = await db.fetchval(_CHUNK, {"file_id": file_id, "seq": seq})
        if data is None:
            return
        yield bytes(data)
        seq += 1


async def lines(db: Database, file_id: str, max_line_bytes: int) -> AsyncIterator[tuple[int, bytes | None]]:
    """(line number from 1, line) for every non-empty line of a file; a line longer than `max_line_bytes` is
    yielded as None (and skipped), so a hostile file cannot make a reader buffer it whole."""
    number, pending, too_long = 0, bytearray(), False
    async for chunk in chunks(db, file_id):
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
