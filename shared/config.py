"""Loading the gateway config: the YAML file, `${VAR}` interpolation, and which process resolves which credentials.

The schema it validates against is shared/config_schema.py; process settings (Kafka, database, master key) are
shared/settings.py.

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
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from switchyard.shared.config_schema import Deployment, GatewayConfig, ModelGroup

DEFAULT_CONFIG_FILE = "switchyard.yaml"
DEMO_MODEL = "demo"
DEMO_PROVIDER = "demo"


class ConfigError(ValueError):
    """A config problem, with the dotted path of the offending field in the message."""


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
