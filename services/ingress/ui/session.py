"""Dashboard sessions: a signed, HttpOnly, SameSite=Strict cookie standing for the master key.

Guarantees:
- The master key itself never leaves the sign-in request: the cookie holds an expiry, a random nonce and an
  HMAC over both, keyed by a secret derived from the master key (rotating the master key ends every session;
  every ingress replica verifies a cookie without shared state).
- A cookie authenticates only same-origin browser requests: a request that a browser marks cross-site or
  same-site-but-other-origin (`Sec-Fetch-Site`), or whose `Origin` is not this server, is refused with a 403
  `cross_site_request`; a state-changing request (anything but GET/HEAD/OPTIONS) must carry a matching `Origin`.
  SameSite=Strict already keeps other sites' pages from sending it; the Origin check also covers pages on
  the same host under another port, which browsers count as the same site.
- Sign-out forgets the nonce on this replica at once; the cookie expires after SESSION_TTL_S everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import time

from starlette.requests import Request

from switchyard.services.ingress.auth import MASTER, Identity
from switchyard.shared.errors import GatewayError

SESSION_COOKIE = "switchyard_session"
SESSION_TTL_S = 8 * 3600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_SIGNED_OUT = 10_000


def _secret(master_key: str) -> bytes:
    return hashlib.sha256(b"switchyard-ui-session\0" + master_key.encode()).digest()


def _sign(master_key: str, payload: str) -> str:
    return hmac.new(_secret(master_key), payload.encode(), hashlib.sha256).hexdigest()


class Sessions:
    """Issues and checks session cookies for one ingress replica."""

    def __init__(self, master_key: str) -> None:
        self.master_key = master_key
        self._signed_out: dict[str, float] = {}

    def issue(self, now: float | None = None) -> str:
        expires = int((now or time.time()) + SESSION_TTL_S)
        payload = f"{expires}.{secrets.token_hex(16)}"
        return f"{payload}.{_sign(self.master_key, payload)}"

    def valid(self, cookie: str | None, now: float | None = None) -> bool:
        if not cookie or not self.master_key or len(cookie) > 200:
            return False
        payload, _, signature = cookie.rpartition(".")
        expires, _, nonce = payload.partition(".")
        if not expires.isdigit() or nonce in self._signed_out:
            return False
        if not hmac.compare_digest(signature.encode(), _sign(self.master_key, payload).encode()):
            return False
        return int(expires) > (now or time.time())

    def sign_out(self, cookie: str | None) -> None:
        if not self.valid(cookie):
            return
        if len(self._signed_out) >= MAX_SIGNED_OUT:  # bounded: the oldest sessions expire on their own
            self._signed_out.clear()
        nonce = (cookie or "").split(".")[1]
        self._signed_out[nonce] = time.time()


@functools.cache
def sessions_for(master_key: str) -> Sessions:
    """The replica's one Sessions object for this master key."""
    return Sessions(master_key)


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


def refuse_cross_site(request: Request, *, need_origin: bool) -> None:
    """403 `cross_site_request` unless the request comes from a page of this origin (see the module doc)."""
    fetch_site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        raise _cross_site()
    if origin is not None and origin != own_origin(request):
        raise _cross_site()
    if need_origin and origin is None:
        raise _cross_site()


def _cross_site() -> GatewayError:
    return GatewayError(403, "Cross-site requests are refused: use the dashboard's own page.",
                        type="invalid_request_error", code="cross_site_request")


def session_identity(request: Request, master_key: str) -> Identity | None:
    """The master identity for a request carrying a valid session cookie and no API key; None otherwise
    (an explicit key always wins, so API clients are unaffected by a stray cookie)."""
    if "authorization" in request.headers or "x-api-key" in request.headers:
        return None
    if not sessions_for(master_key).valid(request.cookies.get(SESSION_COOKIE)):
        return None
    refuse_cross_site(request, need_origin=request.method not in SAFE_METHODS)
    return Identity(key_id=MASTER, is_master=True)
