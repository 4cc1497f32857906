"""Process settings from the environment, falling back to the stack `switchyard up` started in this folder.

Every process reads the same few settings (Kafka bootstrap servers, the database URL, the master key, the
ingress URL) the same way: the environment wins, then `.switchyard/stack.json`, then the local defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

STATE_DIR = ".switchyard"
STACK_FILE = "stack.json"


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
