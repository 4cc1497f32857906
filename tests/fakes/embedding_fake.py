"""A fake OpenAI embeddings API whose vectors the test controls: `vectors[text]` is returned for that text;
any other text gets a fixed pseudo-random unit vector (distinct texts are nearly orthogonal)."""

from __future__ import annotations

import hashlib
import math
import random

import orjson
from fastapi import Request
from fastapi.responses import Response

from tests.fakes.server import FakeProvider

DIMENSIONS = 64


def random_vector(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    vector = [rng.gauss(0, 1) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


def near(vector: list[float], similarity: float, salt: str = "") -> list[float]:
    """A unit vector whose cosine similarity to the unit `vector` is exactly `similarity`."""
    other = random_vector("orthogonal" + salt, len(vector))
    dot = sum(a * b for a, b in zip(vector, other, strict=True))
    ortho = [b - dot * a for a, b in zip(vector, other, strict=True)]
    norm = math.sqrt(sum(x * x for x in ortho))
    ortho = [x / norm for x in ortho]
    side = math.sqrt(1 - similarity * similarity)
    return [similarity * a + side * b for a, b in zip(vector, ortho, strict=True)]


class FakeEmbeddings(FakeProvider):
    """OpenAI's `/v1/embeddings` wire format, with faults like every fake."""

    name = "openai-embeddings"

    def __init__(self) -> None:
        self.vectors: dict[str, list[float]] = {}
        super().__init__()

    def routes(self) -> None:
        @self.app.post("/v1/embeddings")
        async def embeddings(request: Request) -> Response:
            await self.record(request)
            early = await self.fault_response(self.take_fault(request))
            if early is not None:
                return early
            body = orjson.loads(await request.body())
            inputs = body.get("input")
            items = inputs if isinstance(inputs, list) else [inputs]
            data = [{"object": "embedding", "index": i, "embedding": self.vectors.get(str(t)) or random_vector(str(t))}
                    for i, t in enumerate(items)]
            return Response(orjson.dumps({"object": "list", "data": data, "model": body.get("model"),
                                          "usage": {"prompt_tokens": 5, "total_tokens": 5}}),
                            media_type="application/json")
