"""Prices and the cost model, shared by generation (budget cap), serving and evaluation reports.

Prices are USD per 1,000 tokens. The default table holds the Divide-or-Conquer cost model
(gpt-3.5-turbo-1106: $0.001 input, $0.002 output per 1K) and a few common models; a YAML/JSON
file or `Price` overrides add or replace entries. Local models cost nothing unless priced;
`scaled_price` gives the papers' student cost (a teacher's price scaled by parameter count).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from subq.errors import ConfigError


@dataclass(frozen=True)
class Price:
    input_per_1k: float
    output_per_1k: float
    batch_factor: float = 0.5  # Batch API price as a share of the online price (OpenAI: 50%)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens / 1000 * self.input_per_1k + completion_tokens / 1000 * self.output_per_1k

    def batch(self) -> "Price":
        """The price of the same tokens sent through the provider's Batch API."""
        return Price(self.input_per_1k * self.batch_factor, self.output_per_1k * self.batch_factor, 1.0)


DEFAULT_PRICES: dict[str, Price] = {
    "gpt-3.5-turbo": Price(0.001, 0.002),
    "gpt-3.5-turbo-1106": Price(0.001, 0.002),
    "gpt-4o-mini": Price(0.00015, 0.0006),
    "gpt-4o": Price(0.0025, 0.01),
    "local": Price(0.0, 0.0),
}


class PriceTable:
    """Model name -> Price. Unknown models are an error, not a silent $0: budgets depend on it."""

    def __init__(self, prices: dict[str, Price] | None = None):
        self.prices = dict(DEFAULT_PRICES if prices is None else prices)

    @classmethod
    def load(cls, path: str | None = None, extra: dict[str, Price] | None = None) -> "PriceTable":
        table = cls()
        if path:
            import yaml

            try:
                raw = yaml.safe_load(Path(path).read_text())
            except (OSError, yaml.YAMLError) as e:
                raise ConfigError(f"cannot read price table: {e}", source=path) from e
            if not isinstance(raw, dict):
                raise ConfigError("expected a mapping model -> {input_per_1k, output_per_1k[, batch_factor]}", source=path)
            for model, p in raw.items():
                try:
                    table.prices[model] = Price(float(p["input_per_1k"]), float(p["output_per_1k"]),
                                                float(p.get("batch_factor", 0.5)))
                except (KeyError, TypeError, ValueError) as e:
                    raise ConfigError(f"bad price entry: {e}", field=f"{model}", source=path) from e
        table.prices.update(extra or {})
        return table

    def price(self, model: str) -> Price:
        if model in self.prices:
            return self.prices[model]
        # dated snapshots ("gpt-4o-2024-08-06") fall back to their family's price
        for name in sorted(self.prices, key=len, reverse=True):
            if model.startswith(name + "-"):
                return self.prices[name]
        raise ConfigError(
            f"no price for model {model!r}", field="model",
            hint="add it with --price-input-per-1k/--price-output-per-1k or a --price-table YAML file",
        )

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        return self.price(model).cost(prompt_tokens, completion_tokens)

    def with_override(self, model: str, input_per_1k: float | None, output_per_1k: float | None) -> "PriceTable":
        """The one price-override rule (generation, evaluation and serving alike): an override replaces only the
        side it names; the other side keeps the table's price for `model` (0 when the table has none)."""
        if input_per_1k is None and output_per_1k is None:
            return self
        try:
            base = self.price(model)
        except ConfigError:
            base = Price(0.0, 0.0)
        self.prices[model] = Price(base.input_per_1k if input_per_1k is None else input_per_1k,
                                   base.output_per_1k if output_per_1k is None else output_per_1k, base.batch_factor)
        return self

    def to_json(self) -> str:
        return json.dumps({m: vars(p) for m, p in self.prices.items()})


def scaled_price(teacher: Price, student_params: float, teacher_params: float = 175e9) -> Price:
    """The papers' student cost model: the teacher's price scaled by parameter count."""
    r = student_params / teacher_params
    return Price(teacher.input_per_1k * r, teacher.output_per_1k * r)


def estimate_tokens(text: str) -> int:
    """Rough token count for dry-run estimates (about 4 characters per token for English)."""
    return max(1, (len(text) + 3) // 4)
