"""The response cache's store: the `response_cache` table in PostgreSQL, shared by every ingress replica.

Why PostgreSQL with plain `real[]` vectors (docs/decisions/0001-response-cache-store.md): it is already in the
stack, every replica sees a committed entry at once and it survives restarts; no extension is needed (managed
PostgreSQL and the embedded one need no pgvector). A semantic lookup compares the query vector only with the
newest `max_candidates` entries of the same (scope, semantic key) (an index bounds the scan) and computes the
cosine similarity in SQL (vectors are stored unit length, so it is a dot product): nothing is loaded into
the ingress process.

Bounds: an entry larger than `max_entry_bytes` is not stored; `sweep` deletes expired entries and the
oldest past `max_entries` (every replica runs it; the deletes are idempotent). Times are PostgreSQL's
clock, so replicas with skewed clocks agree on an entry's age.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from switchyard.shared.config_schema import CacheConfig
from switchyard.shared.pg import Database, Query

NO_MAX_AGE_S = 1e9


@dataclass
class Found:
    entry: dict[str, Any]
    similarity: float | None = None


_GET_EXACT = Query("""
SELECT entry FROM response_cache
WHERE scope = :scope AND exact_key = :key AND expires_at > now()
  AND created_at > now() - make_interval(secs => CAST(:max_age AS float8))
""")

_GET_SEMANTIC = Query("""
SELECT entry, sim FROM (
  SELECT entry, (SELECT sum(a * b) FROM unnest(embedding, CAST(:vector AS real[])) AS t(a, b)) AS sim
  FROM (SELECT entry, embedding FROM response_cache
        WHERE scope = :scope AND semantic_key = :key AND expires_at > now()
          AND created_at > now() - make_interval(secs => CAST(:max_age AS float8))
          AND cardinality(embedding) = :dim
        ORDER BY created_at DESC LIMIT :candidates) AS recent
) AS scored
WHERE sim >= :threshold ORDER BY sim DESC LIMIT 1
""")

_PUT = Query("""
INSERT INTO response_cache (scope, exact_key, semantic_key, embedding, model_group, created_at, expires_at,
                            entry, size_bytes)
VALUES (:scope, :key, :semantic_key, CAST(:vector AS real[]), :model_group, now(),
        now() + make_interval(secs => CAST(:ttl AS float8)), CAST(CAST(:entry AS text) AS json), :size)
ON CONFLICT (scope, exact_key) DO UPDATE SET
  semantic_key = excluded.semantic_key, embedding = excluded.embedding, model_group = excluded.model_group,
  created_at = excluded.created_at, expires_at = excluded.expires_at, entry = excluded.entry,
  size_bytes = excluded.size_bytes
""")

_DELETE_EXPIRED = Query("""
DELETE FROM response_cache WHERE ctid IN (
  SELECT ctid FROM response_cache WHERE expires_at <= now() LIMIT :batch)
""")

_TRIM = Query("""
DELETE FROM response_cache WHERE ctid IN (
  SELECT ctid FROM response_cache ORDER BY created_at
  LIMIT GREATEST((SELECT count(*) FROM response_cache) - :max_entries, 0))
""")


def unit(vector: list[float]) -> list[float] | None:
    """`vector` scaled to length 1 (cosine similarity becomes a dot product); None for an unusable one."""
    norm = math.sqrt(sum(x * x for x in vector))
    if not vector or not math.isfinite(norm) or norm == 0:
        return None
    return [x / norm for x in vector]


class CacheStore:
    def __init__(self, database: Database, config: CacheConfig) -> None:
        self.database = database
        self.config = config

    async def get_exact(self, scope: str, key: str, max_age_s: float | None) -> Found | None:
        row = await self.database.fetchrow(_GET_EXACT, {"scope": scope, "key": key, "max_age": _max_age(max_age_s)})
        return Found(dict(row["entry"])) if row is not None else None

    async def get_semantic(self, scope: str, key: str, vector: list[float], threshold: float,
                           max_age_s: float | None) -> Found | None:
        """The most similar entry at or above `threshold` among the newest candidates of this context."""
        candidates = self.config.semantic.max_candidates if self.config.semantic else 64
        params = {"scope": scope, "key": key, "vector": vector, "dim": len(vector), "threshold": threshold,
                  "max_age": _max_age(max_age_s), "candidates": candidates}
        row = await self.database.fetchrow(_GET_SEMANTIC, params)
        return Found(dict(row["entry"]), float(row["sim"])) if row is not None else None

    async def put(self, scope: str, key: str, semantic_key: str | None, vector: list[float] | None,
                  model_group: str, ttl_s: float, entry: dict[str, Any]) -> bool:
        """Store (or refresh) an entry; False when it is larger than `max_entry_bytes` and was not stored.
        The entry goes as the JSON text measured (a text parameter cast to json), so it is encoded once."""
        encoded = orjson.dumps(entry).decode()
        if len(encoded) > self.config.max_entry_bytes:
            return False
        params = {"scope": scope, "key": key, "semantic_key": semantic_key if vector else None, "vector": vector,
                  "model_group": model_group, "ttl": ttl_s, "entry": encoded, "size": len(encoded)}
        await self.database.execute(_PUT, params)
        return True

    async def sweep(self, batch: int = 10_000) -> int:
        """Delete expired entries (at most `batch`) and the oldest past `max_entries`; how many went."""
        async with self.database.transaction() as conn:
            expired = await conn.execute(_DELETE_EXPIRED, {"batch": batch})
            trimmed = await conn.execute(_TRIM, {"max_entries": self.config.max_entries})
        return expired + trimmed


def _max_age(max_age_s: float | None) -> float:
    return NO_MAX_AGE_S if max_age_s is None else max_age_s

