"""The dashboard's session cookie and cross-site guard, without a stack: what a forged, tampered, expired or
signed-out cookie gets, and which browser requests the cookie may authenticate."""

from __future__ import annotations

import time

import pytest
from starlette.requests import Request

from switchyard.services.ingress.ui.session import SESSION_COOKIE, Sessions, session_identity, sessions_for
from switchyard.shared.errors import GatewayError

MASTER = "sk-unit-master"


def request(method: str = "GET", cookie: str | None = None, **headers: str) -> Request:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"host", b"127.0.0.1:8080"))
    if cookie is not None:
        raw.append((b"cookie", f"{SESSION_COOKIE}={cookie}".encode()))
    return Request({"type": "http", "method": method, "scheme": "http", "path": "/v1/keys", "headers": raw,
                    "query_string": b"", "server": ("127.0.0.1", 8080)})


def test_only_an_intact_unexpired_cookie_of_this_master_key_is_valid() -> None:
    sessions = Sessions(MASTER)
    cookie = sessions.issue()
    assert sessions.valid(cookie)
    assert MASTER not in cookie
    expires, nonce, signature = cookie.split(".")
    assert not sessions.valid(f"{int(expires) + 999}.{nonce}.{signature}")  # tampered expiry
    assert not sessions.valid(f"{expires}.{nonce}.{'0' * len(signature)}")  # forged signature
    assert not Sessions("sk-other-master").valid(cookie)  # a rotated master key ends every session
    assert not sessions.valid(cookie, now=time.time() + 9 * 3600)  # expired
    for junk in ("", "x", "..", "a.b.c", "1" * 500):
        assert not sessions.valid(junk)
    sessions.sign_out(cookie)
    assert not sessions.valid(cookie)


def test_the_cookie_authenticates_only_same_origin_requests() -> None:
    cookie = sessions_for(MASTER).issue()
    assert session_identity(request(cookie=cookie), MASTER) is not None  # a page load / same-origin GET
    assert session_identity(request(cookie=cookie, sec_fetch_site="same-origin"), MASTER) is not None
    ok_post = request("POST", cookie=cookie, origin="http://127.0.0.1:8080", sec_fetch_site="same-origin")
    identity = session_identity(ok_post, MASTER)
    assert identity is not None and identity.is_master
    refused = [
        request("POST", cookie=cookie),  # a change without Origin
        request("POST", cookie=cookie, origin="http://127.0.0.1:9999"),  # same site, other origin
        request("GET", cookie=cookie, sec_fetch_site="same-site"),
        request("GET", cookie=cookie, sec_fetch_site="cross-site"),
        request("PATCH", cookie=cookie, origin="null"),
    ]
    for r in refused:
        with pytest.raises(GatewayError) as e:
            session_identity(r, MASTER)
        assert e.value.status == 403 and e.value.code == "cross_site_request"
    # No cookie, a bad cookie, or an explicit API key: the cookie plays no part.
    assert session_identity(request("POST"), MASTER) is None
    assert session_identity(request(cookie="1.2.3"), MASTER) is None
    assert session_identity(request(cookie=cookie, authorization="Bearer sk-x"), MASTER) is None
