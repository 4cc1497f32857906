"""Who is calling: the master key (admin and full access) or a virtual key (see keys.py)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from shared.errors import GatewayError


@dataclass
class Identity:
    key_id: str
    is_master: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    allowed_models: list[str] = field(default_factory=list)
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None

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
