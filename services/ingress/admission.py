"""What every request must pass before it may hold anything on this replica: a sane deadline and a free slot.

The deadline is parsed first, before any limit is taken, so a bad `x-switchyard-timeout` costs the
caller nothing but its 400 and takes no slot of anyone's. It is capped by `SWITCHYARD_MAX_TIMEOUT`, so no
caller can hold a connection, a reply registration and a parallel slot for longer than the operator allows.

`InFlightCap` bounds the requests one ingress replica holds at once (`SWITCHYARD_MAX_IN_FLIGHT`, all keys
and the master key together): past it a request gets a 503 `overloaded` with Retry-After at once instead
of growing memory, and it is never sent downstream.
"""

from __future__ import annotations

import math
import os

from switchyard.shared import topics
from switchyard.shared.errors import GatewayError

MAX_TIMEOUT_ENV = "SWITCHYARD_MAX_TIMEOUT"
MAX_IN_FLIGHT_ENV = "SWITCHYARD_MAX_IN_FLIGHT"
OVERLOAD_RETRY_AFTER_S = 1.0


def _positive_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    value = float(raw) if raw else default
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, not {raw!r}")
    return value


def max_timeout_s() -> float:
    """The longest deadline a request may have, in seconds (SWITCHYARD_MAX_TIMEOUT, default 900)."""
    return _positive_env(MAX_TIMEOUT_ENV, 900.0)


def timeout_s(header: str | None, default_s: float, cap_s: float) -> float:
    """The request's timeout in seconds from `x-switchyard-timeout` (else `default_s`), at most `cap_s`.

    Raises a 400 naming the header for anything but a finite positive number (`nan`, `inf` and `1e309`
    included), so the deadline arithmetic after it can never overflow.
    """
    if header is None or not header.strip():
        return min(default_s, cap_s)
    try:
        value = float(header)
    except ValueError:
        raise GatewayError(400, f"{topics.HEADER_TIMEOUT} must be a number of seconds",
                           param=topics.HEADER_TIMEOUT) from None
    if not math.isfinite(value) or value <= 0:
        raise GatewayError(400, f"{topics.HEADER_TIMEOUT} must be a positive, finite number of seconds",
                           param=topics.HEADER_TIMEOUT)
    return min(value, cap_s)


class InFlightCap:
    """A count of the requests this replica holds, refused past `limit` (None: from the environment)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit if limit is not None else int(_positive_env(MAX_IN_FLIGHT_ENV, 4096))
        self.count = 0

    def enter(self) -> None:
        if self.count >= self.limit:
            raise GatewayError(503, "The gateway is at capacity on this replica; retry shortly.",
                               type="server_error", code="overloaded", retry_after_s=OVERLOAD_RETRY_AFTER_S)
        self.count += 1

    def leave(self) -> None:
        self.count = max(0, self.count - 1)
