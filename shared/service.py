"""Running a Kafka-consuming service process: work until SIGTERM/SIGINT or until a task fails."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any


async def run_until_signal(log: logging.Logger, *work: Coroutine[Any, Any, None]) -> None:
    """Run the service's loops; return on a stop signal, or when one loop ends (logging why)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(w) for w in work]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    for task in [*tasks, stopper]:
        task.cancel()
    for task in done:
        if task is not stopper and not task.cancelled() and task.exception():
            log.error("service loop failed", exc_info=task.exception())
    await asyncio.gather(*tasks, return_exceptions=True)


class BackgroundTasks:
    """Work a component starts and does not wait for at once: each task stays referenced until it ends (the
    event loop keeps only weak references, so an unreferenced task can vanish mid-way), and `drain` waits
    for every task under way, including those started while it waits."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
