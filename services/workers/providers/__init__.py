"""Provider adapters by name. Adding a provider: one module here, one line in `ADAPTERS`, one test file."""

from __future__ import annotations

from collections.abc import Callable

from switchyard.services.workers.providers.anthropic import AnthropicAdapter
from switchyard.services.workers.providers.azure import AzureOpenAIAdapter
from switchyard.services.workers.providers.base import ProviderAdapter
from switchyard.services.workers.providers.bedrock import BedrockAdapter
from switchyard.services.workers.providers.cohere import CohereAdapter
from switchyard.services.workers.providers.gemini import GeminiAdapter
from switchyard.services.workers.providers.openai import PRESETS, OpenAICompatibleAdapter

ADAPTERS: dict[str, Callable[[], ProviderAdapter]] = {
    **{name: (lambda n=name: OpenAICompatibleAdapter(n)) for name in PRESETS},  # type: ignore[misc]
    "anthropic": AnthropicAdapter,
    "gemini": GeminiAdapter,
    "cohere": CohereAdapter,
    "azure": AzureOpenAIAdapter,
    "bedrock": BedrockAdapter,
}


def get_adapter(provider: str) -> ProviderAdapter:
    try:
        return ADAPTERS[provider]()
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"unknown provider {provider!r}; known providers: {known}") from None
