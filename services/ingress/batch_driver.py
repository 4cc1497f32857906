"""Runs the batches of the Batches API: any ingress replica may drive any batch; PostgreSQL says which one does.

A batch is driven by one replica at a time, the holder of its lease (`batches.driver`, `lease_until`, renewed
about every second). The replica that accepted a batch drives it at once; when that replica dies, it takes
its batches back as soon as it restarts (its driver name is its reply partition), and any other replica takes
them over once the lease has run out (SWITCHYARD_BATCH_LEASE_S). Everything a driver knows is in PostgreSQL:
- validating: the input file is read line by line from the store and checked (batch_validation.py); the lines
  are stored with the batch in one transaction, or the batch `failed` with the line numbers of what is wrong;
- in_progress, finalizing: batch_run.py sends the lines, stores their answers and writes the output files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import timedelta
from typing import TYPE_CHECKING

from switchyard.services.ingress.batch_run import BatchRun, LeaseLost
from switchyard.services.ingress.database import DATABASE_ERRORS
from switchyard.shared.pg import Database, Query

if TYPE_CHECKING:
    from switchyard.services.ingress.app import Gateway

log = logging.getLogger("switchyard.ingress.batches")

LEASE_S = float(os.environ.get("SWITCHYARD_BATCH_LEASE_S", "30"))
"""How long a batch stays with a replica that stopped renewing its lease before another takes it over."""
CLAIM_EVERY_S = 2.0
MAX_BATCHES = 16
"""Batches one replica drives at once (more wait in PostgreSQL for a free driver)."""
MAX_CONNECTIONS = 9
"""The drivers' pool. A validating batch holds two connections at once (its transaction and the file reader):
too small a pool would leave batches validating side by side waiting on each other until the pool timeout."""

_CLAIM = Query(
    "UPDATE batches SET driver = :me, lease_until = now() + :lease WHERE id IN ("
    " SELECT id FROM batches WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling')"
    " AND (driver = :me OR lease_until IS NULL OR lease_until < now()) AND NOT (id = ANY(:running))"
    " ORDER BY created_at LIMIT :free FOR UPDATE SKIP LOCKED) RETURNING id")


class BatchDriver:
    """Claims unfinished batches whose lease is free and drives each in its own task."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.me = f"ingress-{gateway.reply_partition}"
        self.lease = timedelta(seconds=LEASE_S)
        self.running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._database: Database | None = None

    @property
    def database(self) -> Database:
        if self._database is None:
            self._database = Database(self.gateway.settings.database_url, max_size=MAX_CONNECTIONS,
                                      connect_timeout_s=5.0, command_timeout_s=60.0, pool_timeout_s=30.0)
        return self._database

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._claim()
                except DATABASE_ERRORS as e:
                    log.warning("could not claim batches", extra={"error": repr(e)[:300]})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), CLAIM_EVERY_S)
                self._wake.clear()
        finally:
            for task in list(self.running.values()):
                task.cancel()
            await asyncio.gather(*self.running.values(), return_exceptions=True)
            if self._database is not None:
                await self._database.close()

    async def _claim(self) -> None:
        free = MAX_BATCHES - len(self.running)
        if free <= 0:
            return
        rows = await self.database.fetch(_CLAIM, {"me": self.me, "lease": self.lease, "running": list(self.running),
                                                  "free": free})
        for batch_id in (row["id"] for row in rows):
            self.running[batch_id] = asyncio.create_task(self._drive(batch_id))

    async def _drive(self, batch_id: str) -> None:
        try:
            while True:
                try:
                    await BatchRun(self, batch_id).run()
                    return
                except LeaseLost:
                    log.info("batch driven elsewhere now", extra={"batch_id": batch_id})
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # the broker or PostgreSQL away: try again, the lease says if still ours
                    log.warning("batch driver failed; retrying", extra={"batch_id": batch_id, "error": repr(e)[:300]})
                    await asyncio.sleep(2.0)
        finally:
            self.running.pop(batch_id, None)
