"""Who is calling: the master key (admin and full access) or a virtual key (see keys.py)."""

from __future__ import annotations

import hmac
import logging
import os
import time
from dataclasses import dataclass, field

from switchyard.shared import metrics
from switchyard.shared.errors import GatewayError

log = logging.getLogger("switchyard.ingress.auth")


@dataclass
class Identity:
    key_id: str
    is_master: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    allowed_models: list[str] = field(default_factory=list)
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    guardrails: list[str] = field(default_factory=list)
    log_prompts: bool | None = None

    def may_use(self, model: str) -> bool:
        return self.is_master or not self.allowed_models or model in self.allowed_models


MASTER = "master"


def bearer_token(authorization: str | None, x_api_key: str | None = None) -> str:
    """The caller's key from `Authorization: Bearer` (OpenAI SDKs) or `x-api-key` (Anthropic SDKs)."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key:
        return x_api_key.strip()
    raise GatewayError(401, "Missing API key. Pass it as 'Authorization: Bearer <key>'.", code="missing_api_key")


def is_master(token: str, master_key: str) -> bool:
    return bool(master_key) and hmac.compare_digest(token.encode(), master_key.encode())


AUTH_FAILURE_LIMIT_ENV = "SWITCHYARD_AUTH_FAILURE_LIMIT"
AUTH_WINDOW_S = 60.0
MAX_TRACKED_ADDRESSES = 100_000


class AuthFailures:
    """Failed authentications per client address, refused past `limit` a minute (SWITCHYARD_AUTH_FAILURE_LIMIT,
    default 30) with a 429 `too_many_auth_failures` until the minute ends: a caller guessing keys gets a few
    dozen guesses a minute, whatever its rate. Every failure is counted (`total`, and the Prometheus counter
    `switchyard_auth_failures_total` by code); the first failure of an address in a minute, and its throttling,
    are logged with the address and the reason, never the token.
    The table of addresses is bounded (MAX_TRACKED_ADDRESSES); when full, it restarts empty.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit if limit is not None else int(os.environ.get(AUTH_FAILURE_LIMIT_ENV) or 30)
        self.total = 0
        self._windows: dict[str, tuple[float, int]] = {}

    def _current(self, address: str, now: float) -> tuple[float, int]:
        start, count = self._windows.get(address, (now, 0))
        return (now, 0) if now - start >= AUTH_WINDOW_S else (start, count)

    def check(self, address: str, now: float | None = None) -> None:
        """Raises the 429 while `address` is over its failures for this minute."""
        now = time.time() if now is None else now
        start, count = self._current(address, now)
        if count >= self.limit:
            raise GatewayError(429, "Too many failed authentications from this address; try again later.",
                               code="too_many_auth_failures", retry_after_s=max(1.0, start + AUTH_WINDOW_S - now))

    def failed(self, address: str, err: GatewayError, path: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.total += 1
        metrics.AUTH_FAILURES.labels(code=err.code or "unknown").inc()
        start, count = self._current(address, now)
        if len(self._windows) >= MAX_TRACKED_ADDRESSES and address not in self._windows:
            self._windows.clear()
        self._windows[address] = (start, count + 1)
        if count == 0 or count + 1 == self.limit:
            log.warning("authentication failed" if count == 0 else "throttling an address that keeps failing "
                        "authentication", extra={"client": address, "path": path, "code": err.code,
                                                 "failures": count + 1})
