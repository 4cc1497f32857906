"""The YAML config: ${ENV} interpolation and validation errors that name the bad field."""

from __future__ import annotations

import pytest

from switchyard.shared.config import ConfigError, parse_config

GOOD = """
models:
  - name: gpt-4o-mini
    deployments:
      - provider: openai
        model: gpt-4o-mini
        api_base: https://api.openai.com/v1
        api_key: ${OPENAI_API_KEY}
      - provider: groq
        model: llama-3.3-70b-versatile
        api_key: ${GROQ_KEY:-fallback-key}
"""


def test_interpolates_env_and_defaults() -> None:
    config = parse_config(GOOD, env={"OPENAI_API_KEY": "sk-live"}, secrets_for="openai")
    deps = config.models[0].deployments
    assert deps[0].api_key == "sk-live" and deps[1].api_key is None  # groq's key: only groq's workers hold it
    assert parse_config(GOOD, env={}, secrets_for="groq").models[0].deployments[1].api_key == "fallback-key"
    assert [d.id for d in deps] == ["gpt-4o-mini/0", "gpt-4o-mini/1"]
    assert config.providers() == ["groq", "openai"]
    assert "sk-live" not in repr(deps[0])  # secrets stay out of reprs (and so out of logs)


def test_missing_env_var_names_the_field() -> None:
    dep = parse_config(GOOD, env={}, secrets_for="openai").models[0].deployments[0]
    assert dep.credentials_missing == ("models[0].deployments[0].api_key: environment variable OPENAI_API_KEY "
                                       "is not set")
    with pytest.raises(ConfigError, match=r"models\[0\]\.deployments\[0\]\.api_base: environment variable "
                                          r"OPENAI_BASE is not set"):
        parse_config(GOOD.replace("https://api.openai.com/v1", "${OPENAI_BASE}"), env={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models:\n  - name: x\n    deployments: []\n", r"models\[0\]\.deployments"),
        ("models:\n  - name: x\n    deployments:\n      - model: m\n", r"models\[0\]\.deployments\[0\]\.provider"),
        ("models:\n  - name: x\n    deployments:\n      - {provider: openai, model: m, colour: red}\n",
         r"models\[0\]\.deployments\[0\]\.colour"),
        ("models:\n  - name: x\n    strategy: fastest\n    deployments:\n      - {provider: openai, model: m}\n",
         r"models\[0\]\.strategy"),
        ("models:\n  - name: x\n    fallbacks: [y]\n    deployments:\n      - {provider: openai, model: m}\n",
         "unknown model 'y'"),
        ("models: [\n", "not valid YAML"),
    ],
)
def test_validation_errors_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, env={})


def test_unquoted_azure_api_version_stays_text() -> None:
    config = parse_config("models:\n  - name: a\n    deployments:\n      - {provider: azure, model: m, "
                          "api_base: 'https://x.openai.azure.com', api_version: 2024-10-21}\n", env={})
    assert config.models[0].deployments[0].api_version == "2024-10-21"


def test_bad_rule_regex_is_a_config_error() -> None:
    text = ("models:\n  - name: a\n    deployments:\n      - {provider: openai, model: m}\n"
            "routing_rules:\n  - {route_to: a, last_user_message_regex: '(unclosed'}\n")
    with pytest.raises(ConfigError, match=r"routing_rules\[0\]\.last_user_message_regex"):
        parse_config(text, env={})
