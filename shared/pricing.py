"""The pricing catalogue (shared/pricing.json): USD per million tokens per provider model."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

import orjson

from switchyard.shared.contracts import Usage

CATALOGUE = Path(__file__).parent / "pricing.json"
MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Price:
    input: Decimal
    cached_input: Decimal
    output: Decimal
    source: str
    date: str


@lru_cache(maxsize=1)
def catalogue() -> dict[tuple[str, str], Price]:
    raw = orjson.loads(CATALOGUE.read_bytes())
    return {
        (m["provider"], m["model"]): Price(Decimal(str(m["input"])), Decimal(str(m["cached_input"])),
                                           Decimal(str(m["output"])), m["source"], m["date"])
        for m in raw["models"]
    }


@lru_cache(maxsize=4096)
def lookup(provider: str, model: str) -> Price | None:
    """Exact (provider, model) first, then the same model id under any provider (e.g. via a proxy).

    Cached: workers price every call for `switchyard_cost_usd_total`, and a model missing from the catalogue
    would otherwise cost a walk of the whole catalogue per call. The catalogue never changes in a process."""
    prices = catalogue()
    found = prices.get((provider, model))
    if found:
        return found
    for (_, name), price in prices.items():
        if name == model:
            return price
    return None


def cost(provider: str, model: str, usage: Usage) -> tuple[Decimal, bool]:
    """(cost in USD, whether the model was in the catalogue). Unknown models cost 0 and are flagged."""
    price = lookup(provider, model)
    if price is None:
        return Decimal(0), False
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    uncached = usage.prompt_tokens - cached
    total = uncached * price.input + cached * price.cached_input + usage.completion_tokens * price.output
    return total / MILLION, True
