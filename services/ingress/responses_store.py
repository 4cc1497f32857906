"""Stored Responses API answers in PostgreSQL: shared by every ingress replica, kept across restarts.

A row holds the response object, its input items (for `GET /v1/responses/{id}/input_items`) and its
turn: the chat messages this request added (its input and the answer, never the instructions). A
`previous_response_id` continuation reads the whole chain of turns in one recursive query, so each row
stays the size of one turn however long the conversation grows.

Visibility: a response is seen (read, continued, deleted) only by the key that made it or by a key of
the same team; for anyone else it does not exist (404, as OpenAI answers for another project's id).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from switchyard.services.ingress.auth import Identity
from switchyard.services.ingress.database import database_errors_as_503
from switchyard.shared.errors import GatewayError
from switchyard.shared.pg import Database, Query

MAX_CHAIN = 1000
"""The longest previous_response_id chain followed (a longer one is refused, never read unbounded)."""

_VISIBLE = "(key_id = :key_id OR team = :team)"
"""Made by this key, or by a key of its team (`:team` NULL, for the master key or a key without a team, matches
no row: then only the key's own responses are visible)."""

_INSERT = Query("""
INSERT INTO responses (id, key_id, team, previous_id, created_at, response, input_items, turn)
VALUES (:id, :key_id, :team, :previous_id, :created_at, :response, :input_items, :turn)
""")

_READ = {column: Query(f"SELECT {column} FROM responses WHERE id = :id AND {_VISIBLE}")
         for column in ("response", "input_items", "id")}
"""One column of a visible response, by column name (a fixed set: never a name from a request)."""

_DELETE = Query(f"DELETE FROM responses WHERE id = :id AND {_VISIBLE}")

_CHAIN = Query("""
WITH RECURSIVE chain(id, previous_id, turn, depth) AS (
    SELECT id, previous_id, turn, 0 FROM responses WHERE id = :id
  UNION ALL
    SELECT r.id, r.previous_id, r.turn, c.depth + 1 FROM responses r JOIN chain c ON r.id = c.previous_id
    WHERE c.depth < :max_depth
)
SELECT previous_id, turn, depth FROM chain ORDER BY depth DESC
""")


def not_found(rid: str, param: str | None = None) -> GatewayError:
    return GatewayError(404, f"Response with id '{rid}' not found.", type="invalid_request_error", param=param,
                        code="response_not_found" if param else None)


def _team(identity: Identity) -> str | None:
    return None if identity.is_master else identity.metadata.get("team") or None


def _visible(identity: Identity) -> dict[str, Any]:
    """The parameters of `_VISIBLE` for `identity`."""
    return {"key_id": identity.key_id, "team": _team(identity)}


class ResponseStore:
    """Reads and writes of stored responses; PostgreSQL failures become 503s (`database_errors_as_503`)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def save(self, identity: Identity, response: dict[str, Any], input_items: list[dict[str, Any]],
                   turn: list[dict[str, Any]]) -> None:
        row = {"id": response["id"], "key_id": identity.key_id, "team": _team(identity),
               "previous_id": response.get("previous_response_id"),
               "created_at": datetime.fromtimestamp(response["created_at"], UTC), "response": response,
               "input_items": input_items, "turn": turn}
        with database_errors_as_503("Storing a response"):
            await self.database.execute(_INSERT, row)

    async def get(self, identity: Identity, rid: str) -> dict[str, Any]:
        return dict(await self._one(identity, rid, "response"))

    async def input_items(self, identity: Identity, rid: str) -> list[dict[str, Any]]:
        return list(await self._one(identity, rid, "input_items"))

    async def _one(self, identity: Identity, rid: str, column: str, param: str | None = None) -> Any:
        with database_errors_as_503("Reading a stored response"):
            value = await self.database.fetchval(_READ[column], {"id": rid, **_visible(identity)})
        if value is None:
            raise not_found(rid, param)
        return value

    async def history(self, identity: Identity, rid: str) -> list[dict[str, Any]]:
        """The chat messages of the conversation up to and including response `rid` (oldest first).

        404 (param `previous_response_id`) when `rid` is not visible to `identity`; 400 when an earlier
        response of the chain was deleted or the chain is longer than MAX_CHAIN.
        """
        await self._one(identity, rid, "id", "previous_response_id")
        with database_errors_as_503("Continuing a stored response"):
            rows = await self.database.fetch(_CHAIN, {"id": rid, "max_depth": MAX_CHAIN})
        if not rows or rows[0]["previous_id"] is not None:
            what = ("is longer than the gateway follows" if rows and rows[0]["depth"] >= MAX_CHAIN
                    else "refers to a response that was deleted")
            raise GatewayError(400, f"The conversation of '{rid}' {what}; start a new one.",
                               param="previous_response_id", code="invalid_value")
        return [message for row in rows for message in row["turn"]]

    async def delete(self, identity: Identity, rid: str) -> None:
        with database_errors_as_503("Deleting a stored response"):
            deleted = await self.database.execute(_DELETE, {"id": rid, **_visible(identity)})
        if not deleted:
            raise not_found(rid)


def page(items: list[dict[str, Any]], *, after: str | None, limit: int, order: str) -> dict[str, Any]:
    """One page of input items as OpenAI lists them: `data`, `first_id`, `last_id`, `has_more`."""
    ordered = items if order == "asc" else list(reversed(items))
    if after is not None:
        ids = [item.get("id") for item in ordered]
        ordered = ordered[ids.index(after) + 1:] if after in ids else []
    data = ordered[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(ordered) > limit}
