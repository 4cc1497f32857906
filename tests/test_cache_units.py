"""The response cache's config names and checks, and Cache-Control parsing (no stack needed)."""

from __future__ import annotations

import pytest


def test_config_names_and_checks() -> None:
    """The names the issue gives, and a semantic embedding model that is not a group of the config is refused."""
    from switchyard.shared.config import ConfigError, parse_config

    dep = "{provider: openai, model: m, api_key: k}"
    cfg = parse_config(f"""
cache: {{ttl_s: 60, semantic: {{embedding_model: embed, threshold: 0.9}}}}
models:
  - {{name: chat, cache: true, deployments: [{dep}]}}
  - {{name: embed, deployments: [{dep}]}}
""")
    assert cfg.cache.ttl_s == 60 and cfg.cache.semantic is not None and cfg.cache.semantic.threshold == 0.9
    assert [m.cache for m in cfg.models] == [True, False]
    with pytest.raises(ConfigError, match="embedding_model"):
        parse_config(f"cache: {{semantic: {{embedding_model: nope}}}}\nmodels: [{{name: a, deployments: [{dep}]}}]")
    with pytest.raises(ConfigError, match="threshold"):
        parse_config(f"cache: {{semantic: {{embedding_model: a, threshold: 1.5}}}}\n"
                     f"models: [{{name: a, deployments: [{dep}]}}]")


def test_cache_control_parsing() -> None:
    from switchyard.services.ingress.cache_keys import cache_control
    from switchyard.shared.errors import GatewayError

    assert cache_control(None).lookup and cache_control(None).store
    assert (c := cache_control("No-Cache")).lookup is False and c.store is True
    assert (c := cache_control("no-store, private")).lookup is False and c.store is False
    assert cache_control("max-age=30").max_age_s == 30.0
    assert cache_control('max-age="0"').max_age_s == 0.0
    for bad in ("max-age=-1", "max-age=1.5", "max-age=", "max-age=\u00b2"):
        with pytest.raises(GatewayError):
            cache_control(bad)
