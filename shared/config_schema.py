"""The gateway config's schema: model groups and their deployments, routing rules, cache, guardrails, logging.

Pydantic models that refuse unknown fields and check what refers to what (fallbacks, rules and the semantic
cache name model groups of the same config; guardrail, model and deployment names are unique), so a config
that loads is one every service can act on. Reading the YAML, `${VAR}` interpolation and where credentials are
resolved is shared/config.py.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from switchyard.shared.guardrails import GuardrailSpec, PromptLogging

Strategy = Literal["fallback", "weighted", "latency", "cost", "least-busy"]


class Deployment(BaseModel):
    """One provider model that can serve a model group. Workers hold its secrets; envelopes carry only `id`."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    model: str
    id: str = ""
    api_base: str | None = None
    api_key: str | None = Field(default=None, repr=False)
    api_keys: list[str] = Field(default_factory=list, repr=False)
    api_version: str | None = None
    region: str | None = None
    aws_access_key_id: str | None = Field(default=None, repr=False)
    aws_secret_access_key: str | None = Field(default=None, repr=False)
    aws_session_token: str | None = Field(default=None, repr=False)
    weight: float = Field(default=1.0, ge=0)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    timeout_s: float = Field(default=600.0, gt=0)
    first_byte_timeout_s: float = Field(default=60.0, gt=0)
    context_window: int | None = Field(default=None, ge=1)
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    _credentials_missing: str | None = PrivateAttr(default=None)

    @property
    def credentials_missing(self) -> str | None:
        """Why this deployment's credentials could not be resolved in this worker (the field and the variable,
        never a value); None when they were, or when this process does not resolve them."""
        return self._credentials_missing

    @field_validator("api_version", mode="before")
    @classmethod
    def _date_as_text(cls, value: Any) -> Any:
        """YAML reads an unquoted `2024-10-21` as a date; Azure wants the text."""
        return value.isoformat() if isinstance(value, date) else value

    def all_api_keys(self) -> list[str]:
        """Every API key of this deployment, in rotation order."""
        return [k for k in [self.api_key, *self.api_keys] if k]


class ModelGroup(BaseModel):
    """What callers ask for by name, and the deployments that can serve it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    strategy: Strategy = "fallback"
    deployments: list[Deployment] = Field(min_length=1)
    fallbacks: list[str] = Field(default_factory=list)
    context_window_fallback: str | None = None
    content_policy_fallback: str | None = None
    cache: bool = False
    """Answers of this group are cached (see `cache:` at the top level); groups opt in."""
    cache_ttl_s: float | None = Field(default=None, gt=0)
    """This group's time to live of a cache entry, instead of `cache.ttl_s`."""
    log_prompts: bool | None = None
    """Store this group's requests and answers in the prompt log (None: the global `logging.prompts`)."""

    @model_validator(mode="after")
    def _name_deployments(self) -> ModelGroup:
        for i, dep in enumerate(self.deployments):
            if not dep.id:
                dep.id = f"{self.name}/{i}"
        return self


class RouteRule(BaseModel):
    """A content or metadata rule that sends matching requests to another model group (first match wins)."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    route_to: str
    models: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)
    min_input_tokens: int | None = None
    max_input_tokens: int | None = None
    has_tools: bool | None = None
    has_images: bool | None = None
    last_user_message_regex: str | None = None

    @field_validator("last_user_message_regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return value


class SemanticCacheConfig(BaseModel):
    """Semantic matching of the last user message; without it the cache matches exactly only."""

    model_config = ConfigDict(extra="forbid")

    embedding_model: str = Field(min_length=1)
    """A model group of this config, called through Switchyard's own pipeline."""
    threshold: float = Field(default=0.95, gt=0, le=1)
    """Cosine similarity needed for a hit."""
    max_candidates: int = Field(default=64, ge=1, le=10_000)
    """The most recent entries of one context that a semantic lookup compares against."""


class CacheConfig(BaseModel):
    """The response cache (services/ingress/cache.py): stored in PostgreSQL, shared by every ingress replica."""

    model_config = ConfigDict(extra="forbid")

    ttl_s: float = Field(default=3600.0, gt=0)
    semantic: SemanticCacheConfig | None = None
    max_entries: int = Field(default=100_000, ge=1)
    """The store keeps at most this many entries (the oldest go first)."""
    max_entry_bytes: int = Field(default=1 << 20, ge=1024)
    """Answers larger than this (serialised) are not stored."""
    lookup_timeout_s: float = Field(default=1.0, gt=0)
    """A lookup that takes longer is a miss (the store is slow or down)."""


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelGroup] = Field(default_factory=list)
    routing_rules: list[RouteRule] = Field(default_factory=list)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    guardrails: list[GuardrailSpec] = Field(default_factory=list)
    logging: PromptLogging = Field(default_factory=PromptLogging)

    @model_validator(mode="after")
    def _check_names(self) -> GatewayConfig:
        guardrail_names = [g.name for g in self.guardrails]
        repeated = sorted({n for n in guardrail_names if guardrail_names.count(n) > 1})
        if repeated:
            raise ValueError(f"guardrail names must be unique; repeated: {repeated}")
        names = [m.name for m in self.models]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {sorted(dupes)}")
        ids = [d.id for m in self.models for d in m.deployments]
        dupe_ids = {i for i in ids if ids.count(i) > 1}
        if dupe_ids:
            raise ValueError(f"deployment ids must be unique; repeated: {sorted(dupe_ids)}")
        known = set(names)
        for m in self.models:
            for ref in [*m.fallbacks, m.context_window_fallback, m.content_policy_fallback]:
                if ref and ref not in known:
                    raise ValueError(f"model {m.name!r} falls back to unknown model {ref!r}")
        for r in self.routing_rules:
            if r.route_to not in known:
                raise ValueError(f"routing rule {r.name or r.route_to!r} routes to unknown model {r.route_to!r}")
        if self.cache.semantic and self.cache.semantic.embedding_model not in known:
            raise ValueError(f"cache.semantic.embedding_model {self.cache.semantic.embedding_model!r} is not a "
                             "model group of this config")
        return self

    def group(self, name: str) -> ModelGroup | None:
        for m in self.models:
            if m.name == name:
                return m
        return None

    def deployment(self, deployment_id: str) -> Deployment | None:
        for m in self.models:
            for d in m.deployments:
                if d.id == deployment_id:
                    return d
        return None

    def providers(self) -> list[str]:
        return sorted({d.provider for m in self.models for d in m.deployments})
