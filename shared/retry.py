"""How Switchyard retries: every retry loop is a `stamina.retry_context` made here, so what is retried, how
long the waits grow and when a loop gives up are read off one call per loop, not rewritten by hand.

Each loop logs its own warning (naming what it retries, with a bounded error text), so stamina's default
instrumentation is switched off when this module is imported: it would log each exception's whole repr
(an SQLAlchemy error quotes its statement's parameters, which may hold a prompt) and register a Prometheus
counter that no Switchyard metric name defines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import stamina

stamina.instrumentation.set_on_retry_hooks(())

Retried = type[Exception] | tuple[type[Exception], ...]
"""The exceptions a loop retries; any other one propagates at once."""


def attempts(on: Retried, *, first_s: float, max_s: float, tries: int | None = None,
             timeout_s: float | None = None) -> AsyncIterator[stamina.Attempt]:
    """Attempts of a block (`async for attempt in ...: with attempt: ...`): an exception in `on` is retried
    after `first_s`, each wait twice the one before, up to `max_s` (no jitter: the timings stay exactly
    these). The loop gives up, re-raising the last exception, after `tries` attempts or once `timeout_s`
    have passed since the first; with neither, it never gives up (for work that must not be dropped, such
    as a batch whose Kafka offsets are held until it is stored)."""
    return stamina.retry_context(on=on, attempts=tries, timeout=timeout_s, wait_initial=first_s, wait_max=max_s,
                                 wait_jitter=0.0)
