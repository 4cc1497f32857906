"""AWS Signature Version 4 (header form, `AWS4-HMAC-SHA256`) for one HTTP request.

Written out because botocore is not a dependency; checked against AWS's published examples
(the IAM `ListUsers` example and cases of the SigV4 test suite) and against botocore's own
signer for a Bedrock request (see tests/test_provider_bedrock.py).

The steps, as AWS documents them:
  1. canonical request: method, canonical URI, canonical query, canonical headers, signed header
     names, hex SHA-256 of the payload;
  2. string to sign: algorithm, `x-amz-date`, scope (`date/region/service/aws4_request`), hex
     SHA-256 of the canonical request;
  3. signing key: HMAC chain `AWS4`+secret -> date -> region -> service -> `aws4_request`;
  4. signature: hex HMAC of the string to sign with that key, sent in `Authorization`.

Paths: every service but S3 signs the path *as sent on the wire, URI-encoded once more*. A Bedrock
model id `anthropic.claude-3-haiku-20240307-v1:0` travels as `...v1%3A0` and is signed as
`...v1%253A0`; signing the single-encoded form is the classic cause of `InvalidSignatureException`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote, unquote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# Headers left out of the signature: they are set or rewritten by HTTP clients and proxies on the way.
_UNSIGNED = frozenset({"authorization", "user-agent", "expect", "x-amzn-trace-id", "content-length",
                       "connection", "accept-encoding", "transfer-encoding"})
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")."""
    k_date = _hmac(("AWS4" + secret).encode("utf-8"), date)
    return _hmac(_hmac(_hmac(k_date, region), service), "aws4_request")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 dot-segment removal as AWS SDKs do it (empty segments collapse too)."""
    if not path:
        return "/"
    out: list[str] = []
    for seg in path.split("/"):
        if not seg or seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
        else:
            out.append(seg)
    trailing = "/" if path.endswith("/") and out else ""
    return "/" + "/".join(out) + trailing


def canonical_uri(path: str, service: str) -> str:
    """The path as sent (already percent-encoded), normalised and encoded again; S3 signs it as it is."""
    if service == "s3":
        return path or "/"
    return quote(_remove_dot_segments(path), safe="/~")


def canonical_query(query: str) -> str:
    """Parameters sorted by name then value, each name and value URI-encoded (RFC 3986 unreserved kept)."""
    if not query:
        return ""
    pairs = []
    for item in query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append((quote(unquote(name), safe="~"), quote(unquote(value), safe="~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def canonical_headers(headers: Mapping[str, str], names: list[str]) -> str:
    """`name:value\\n` per signed header: lower-case names, trimmed values with inner whitespace collapsed."""
    lowered: dict[str, list[str]] = {}
    for key, value in headers.items():
        lowered.setdefault(key.lower(), []).append(_SPACES.sub(" ", str(value).strip()))
    return "".join(f"{n}:{','.join(lowered.get(n, []))}\n" for n in names)


def canonical_request(method: str, path: str, query: str, headers: Mapping[str, str], signed: list[str],
                      payload_hash: str, service: str) -> str:
    return "\n".join([method.upper(), canonical_uri(path, service), canonical_query(query),
                      canonical_headers(headers, signed), ";".join(signed), payload_hash])


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    return "\n".join([ALGORITHM, amz_date, scope, sha256_hex(canonical.encode("utf-8"))])


def signature(secret: str, amz_date: str, region: str, service: str, canonical: str) -> str:
    date = amz_date[:8]
    scope = f"{date}/{region}/{service}/aws4_request"
    key = signing_key(secret, date, region, service)
    return hmac.new(key, string_to_sign(amz_date, scope, canonical).encode("utf-8"), hashlib.sha256).hexdigest()


def host_header(url: str) -> str:
    """The Host header an HTTP client sends for `url`: the host, and the port unless it is the default."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = parts.port
    default = 443 if parts.scheme == "https" else 80
    return f"{host}:{port}" if port and port != default else host


def sign(method: str, url: str, headers: Mapping[str, str], body: bytes | None, credentials: Credentials,
         region: str, service: str, now: datetime | None = None) -> dict[str, str]:
    """`headers` plus `host`, `x-amz-date`, `x-amz-security-token` (with temporary credentials) and
    `authorization`. Every header passed in is signed except the few that clients rewrite."""
    out = {k.lower(): v for k, v in headers.items() if k.lower() != "authorization"}
    out.setdefault("host", host_header(url))
    amz_date = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    out["x-amz-date"] = amz_date
    if credentials.session_token:
        out["x-amz-security-token"] = credentials.session_token
    signed = sorted(n for n in out if n not in _UNSIGNED)
    parts = urlsplit(url)
    canonical = canonical_request(method, parts.path, parts.query, out, signed,
                                  sha256_hex(body or b""), service)
    sig = signature(credentials.secret_access_key, amz_date, region, service, canonical)
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    out["authorization"] = (f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
                            f"SignedHeaders={';'.join(signed)}, Signature={sig}")
    return out


@dataclass(frozen=True)
class Authorization:
    """A parsed `AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...` header."""

    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: list[str]
    signature: str


_AUTH = re.compile(r"^AWS4-HMAC-SHA256 Credential=([^/,\s]+)/(\d{8})/([^/,\s]+)/([^/,\s]+)/aws4_request,\s*"
                   r"SignedHeaders=([a-z0-9\-;]+),\s*Signature=([0-9a-f]{64})$")


def parse_authorization(value: str) -> Authorization | None:
    m = _AUTH.match(value.strip())
    if m is None:
        return None
    return Authorization(m[1], m[2], m[3], m[4], m[5].split(";"), m[6])
