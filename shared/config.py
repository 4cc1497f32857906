"""Configuration: the YAML model list (validated by pydantic) and the process settings from the environment.

`${VAR}` and `${VAR:-default}` in the YAML are replaced from the environment, so secrets
stay out of the file. A missing variable is an error that names the field that needed it.

A deployment's credentials (CREDENTIAL_FIELDS) are the exception: they are resolved only in the worker pool of
that deployment's provider (`load_config(..., secrets_for=provider)`); every other process (ingress, router,
accounting, the CLI, other providers' workers) loads them blank and never reads their variables. So no process
holds a secret it does not use, and a variable missing for one provider stops no other process from starting.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from switchyard.shared.guardrails import GuardrailSpec, PromptLogging

STATE_DIR = ".switchyard"
STACK_FILE = "stack.json"
DEFAULT_CONFIG_FILE = "switchyard.yaml"
DEMO_MODEL = "demo"
DEMO_PROVIDER = "demo"

Strategy = Literal["fallback", "weighted", "latency", "cost", "least-busy"]


class ConfigError(ValueError):
    """A config problem, with the dotted path of the offending field in the message."""


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


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
CREDENTIAL_FIELDS = ("api_key", "api_keys", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                     "headers")
"""The fields of a deployment that hold secrets: resolved only by the worker pool of its provider."""
_DEPLOYMENT_PATH = re.compile(r"^models\[\d+\]\.deployments\[\d+\]$")


def _blank(name: str) -> Any:
    """The value of credential field `name` in a process that does not hold it."""
    return [] if name == "api_keys" else {} if name == "headers" else None


def _interpolate(node: Any, path: str, env: dict[str, str]) -> Any:
    """`node` with `${VAR}` replaced, except in a deployment's CREDENTIAL_FIELDS (left as written)."""
    if isinstance(node, dict):
        if _DEPLOYMENT_PATH.match(path):
            return {k: v if k in CREDENTIAL_FIELDS else _interpolate(v, f"{path}.{k}", env) for k, v in node.items()}
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable {name} is not set")

        return _VAR.sub(sub, node)
    return node


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _scope_credentials(config: GatewayConfig, secrets_for: str | None, env: dict[str, str]) -> None:
    """Resolve the credentials of `secrets_for`'s deployments; blank every other deployment's.

    A variable missing for one of this provider's deployments does not stop the worker: that deployment's
    credentials stay blank, `credentials_missing` says which field and variable, and the worker answers its
    calls with an auth error (the operator's log names the variable) while its other deployments serve."""
    for m_index, group in enumerate(config.models):
        for d_index, dep in enumerate(group.deployments):
            path = f"models[{m_index}].deployments[{d_index}]"
            resolved: dict[str, Any] = {name: _blank(name) for name in CREDENTIAL_FIELDS}
            missing = None
            if dep.provider == secrets_for:
                for name in CREDENTIAL_FIELDS:
                    try:
                        resolved[name] = _interpolate(getattr(dep, name), f"{path}.{name}", env)
                    except ConfigError as e:
                        missing = str(e)
                        break
            for name in CREDENTIAL_FIELDS:
                setattr(dep, name, resolved[name] if missing is None else _blank(name))
            dep._credentials_missing = missing


PROVIDER_ENV_KEYS: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "azure": ("AZURE_OPENAI_API_KEY", "AZURE_API_KEY"),
    "bedrock": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_BEARER_TOKEN_BEDROCK"),
    "cohere": ("COHERE_API_KEY", "CO_API_KEY"),
    "mistral": ("MISTRAL_API_KEY",),
    "deepseek": ("DEEPSEEK_API_KEY",),
    "groq": ("GROQ_API_KEY",),
    "together": ("TOGETHER_API_KEY",),
    "xai": ("XAI_API_KEY",),
    "openrouter": ("OPENROUTER_API_KEY",),
    "fireworks": ("FIREWORKS_API_KEY",),
}
"""The variables a provider's key conventionally lives in (the SDKs' own, and what Bedrock's worker reads from its
environment). `switchyard up` gives them to that provider's workers only, whether the config names them or not."""


def secret_variables(text: str | None) -> dict[str, set[str]]:
    """Provider -> the environment variables that hold its secrets: every `${VAR}` in the CREDENTIAL_FIELDS of
    its deployments in the config `text` (None: no config file), plus its PROVIDER_ENV_KEYS. What the
    supervisor keeps out of every process but that provider's workers. A variable the config also uses outside
    credentials (an `api_base`) is not a secret: every process resolves it, and needs it to start."""
    found: dict[str, set[str]] = {provider: set(names) for provider, names in PROVIDER_ENV_KEYS.items()}
    try:
        raw = yaml.safe_load(text or "") or {}
    except yaml.YAMLError:
        return found  # load_config reports it
    models = raw.get("models") if isinstance(raw, dict) else None
    public = _var_names({k: v for k, v in raw.items() if k != "models"} if isinstance(raw, dict) else raw)
    for group in models if isinstance(models, list) else []:
        if not isinstance(group, dict):
            continue
        public |= _var_names({k: v for k, v in group.items() if k != "deployments"})
        deployments = group.get("deployments")
        for dep in deployments if isinstance(deployments, list) else []:
            if not isinstance(dep, dict):
                continue
            public |= _var_names({k: v for k, v in dep.items() if k not in CREDENTIAL_FIELDS})
            if isinstance(dep.get("provider"), str):
                found.setdefault(dep["provider"], set()).update(
                    *(_var_names(dep.get(name)) for name in CREDENTIAL_FIELDS))
    return {provider: names - public for provider, names in found.items()}


def _var_names(node: Any) -> set[str]:
    """The names of the `${VAR}`s anywhere in `node` (strings in nested lists and mappings)."""
    if isinstance(node, str):
        return {m.group(1) for m in _VAR.finditer(node)}
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        return set().union(*(_var_names(v) for v in node))
    return set()


def parse_config(text: str, env: dict[str, str] | None = None, source: str = "config",
                 secrets_for: str | None = None) -> GatewayConfig:
    """The validated config. Credentials are resolved for the deployments of provider `secrets_for` only
    (a worker pool's own); every other deployment's are blank (see CREDENTIAL_FIELDS)."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a `models` list")
    environ = dict(os.environ) if env is None else env
    raw = _interpolate(raw, "", environ)
    try:
        config = GatewayConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{_loc(err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{source}: {problems}") from None
    _scope_credentials(config, secrets_for, environ)
    return config


def demo_group(api_base: str) -> ModelGroup:
    return ModelGroup(
        name=DEMO_MODEL,
        deployments=[Deployment(provider=DEMO_PROVIDER, model="demo-1", api_base=api_base, api_key="demo")],
    )


def config_path(explicit: str | None = None) -> Path | None:
    """`--config`, else SWITCHYARD_CONFIG, else ./switchyard.yaml if present."""
    chosen = explicit or os.environ.get("SWITCHYARD_CONFIG")
    if chosen:
        return Path(chosen)
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def load_config(explicit: str | None = None, secrets_for: str | None = None) -> GatewayConfig:
    """The gateway config; with no models configured, `demo` is served by the built-in fake provider.
    Only a worker passes `secrets_for` (its provider): the credentials of that provider's deployments."""
    path = config_path(explicit)
    if path is None:
        config = GatewayConfig()
    else:
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        config = parse_config(path.read_text(), source=str(path), secrets_for=secrets_for)
    demo_url = os.environ.get("SWITCHYARD_DEMO_URL")
    if not config.models and demo_url:
        config.models.append(demo_group(demo_url))
    return config


@dataclass
class Settings:
    """Process settings from the environment, falling back to a stack `switchyard up` started here."""

    bootstrap_servers: str = "127.0.0.1:9092"
    database_url: str = ""
    master_key: str = ""
    ingress_url: str = "http://127.0.0.1:8080"
    extra: dict[str, Any] = field(default_factory=dict)


def asyncpg_url(url: str) -> str:
    """Accept plain `postgresql://` URLs and point SQLAlchemy at asyncpg."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


def cache_home(env_var: str, folder: str) -> Path:
    """Where a download is kept: `$env_var` when set, else <XDG_CACHE_HOME or ~/.cache>/switchyard/<folder>
    (outside the repo, shared by every checkout)."""
    explicit = os.environ.get(env_var)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "switchyard" / folder


def stack_file(base: Path | None = None) -> Path:
    return (base or Path.cwd()) / STATE_DIR / STACK_FILE


def read_stack(base: Path | None = None) -> dict[str, Any]:
    path = stack_file(base)
    try:
        return dict(orjson.loads(path.read_bytes()))
    except (FileNotFoundError, ValueError):
        return {}


def load_settings() -> Settings:
    stack = read_stack()
    env = os.environ
    return Settings(
        bootstrap_servers=env.get("KAFKA_BOOTSTRAP_SERVERS") or stack.get("bootstrap_servers") or "127.0.0.1:9092",
        database_url=asyncpg_url(env.get("DATABASE_URL") or stack.get("database_url") or ""),
        master_key=env.get("SWITCHYARD_MASTER_KEY") or stack.get("master_key") or "",
        ingress_url=env.get("SWITCHYARD_URL") or stack.get("ingress_url") or "http://127.0.0.1:8080",
    )
