"""How a solver and a decomposer are reached and decode: the settings shared by the Serve app, `subq eval`
and the demo (pydantic; no Ray, no torch)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

from subq.costs import Price, PriceTable
from subq.errors import ConfigError

# ---------------------------------------------------------------- settings

# The command-line names these settings had before `subq serve`/`subq eval` derived their flags from the config
# (`--solver-name`, `--decomposer-beta`, ...): kept as declared aliases (subq.cli_options.config_command).
FLAG_ALIASES = {
    "solver.name": ["--solver-model"], "solver.api_key_env": ["--api-key-env"],
    "solver.price_input_per_1k": ["--solver-price-input"], "solver.price_output_per_1k": ["--solver-price-output"],
    "decomposer.beta": ["--beta"], "decomposer.max_new_tokens": ["--max-new-tokens"],
}



class SolverSettings(BaseModel):
    """How the solver (answerer) is reached. Shared by the Serve app and `subq eval`."""

    name: str = Field("gpt-3.5-turbo", description="Model name sent upstream (openai) or served id (local); also the price-table key.")
    backend: Literal["openai", "local"] = Field("openai", description="openai: any OpenAI-compatible endpoint via the openai SDK; local: an HF causal LM on this node.")
    base_url: Optional[str] = Field(None, description="OpenAI-compatible base URL (e.g. http://127.0.0.1:8100/v1); None = the SDK default (api.openai.com).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the upstream key (the key itself never goes in a config).")
    local_path: Optional[str] = Field(None, description="HF checkpoint directory for backend=local.")
    prompt: Literal["paper", "doc"] = Field("paper", description="paper: GSM8K-AI-SubQ QA prompt ('Final answer:'); doc: Divide-or-Conquer solver prompt ('The answer is:').")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature (the paper evaluates at 0).")
    max_tokens: int = Field(500, gt=0, description="Max completion tokens per solver call (paper: 500).")
    max_retries: int = Field(4, ge=0, description="Retries on 429/5xx/timeouts before the call fails (then HTTP 502).")
    timeout_s: float = Field(60.0, gt=0, description="Per-call timeout in seconds.")
    rpm: Optional[float] = Field(None, gt=0, description="Requests/minute cap through the cluster limiter (None: no cap).")
    tpm: Optional[float] = Field(None, gt=0, description="Tokens/minute cap through the cluster limiter (None: no cap).")
    price_table: Optional[str] = Field(None, description="YAML price table adding/overriding subq.costs defaults.")
    price_input_per_1k: Optional[float] = Field(None, ge=0, description="Override: $ per 1K prompt tokens for this solver.")
    price_output_per_1k: Optional[float] = Field(None, ge=0, description="Override: $ per 1K completion tokens for this solver.")
    cache_dir: Optional[str] = Field(None, description="Durable request cache of solver replies (actors.teacher.RequestCache): a re-run pays nothing. `subq eval` default: <out>/cache.")

    def price(self) -> Price:
        # the one override rule (subq.costs.PriceTable.with_override), as in generation: a side not overridden
        # keeps the table's price (a local backend's table price is 0)
        table = PriceTable({self.name: Price(0.0, 0.0)}) if self.backend == "local" else PriceTable.load(self.price_table)
        try:
            return table.with_override(self.name, self.price_input_per_1k, self.price_output_per_1k).price(self.name)
        except ConfigError:
            raise ConfigError(f"no price for solver model {self.name!r}", field="solver.name",
                              hint="set solver.price_input_per_1k/price_output_per_1k (--solver-price-input/--solver-price-output) "
                                   "or solver.price_table") from None

    def upstream(self) -> str:
        if self.backend == "local":
            return f"local:{self.local_path}"
        return self.base_url or "https://api.openai.com/v1"


class DecomposerSettings(BaseModel):
    """The distilled decomposer: a local HF (BC/FBC) or ILQL checkpoint."""

    path: Optional[str] = Field(None, description="Checkpoint directory (training's HF save, ILQL heads beside it). None: no distilled decomposer.")
    name: str = Field("subq-decomposer", description="Id under which it is listed on /v1/models and in reports.")
    beta: Optional[float] = Field(None, description="ILQL guidance weight (log pi + beta*(minQ - V)); None: the checkpoint's own ilql.beta (as in training's validation); ignored without heads; 0 = plain BC decoding.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature when do_sample.")
    max_new_tokens: int = Field(256, gt=0, le=4096, description="Max generated tokens per decomposition (training.decomposer.DEFAULT_MAX_NEW_TOKENS; the release allowed the reference length + 200).")
    device: str = Field("cpu", description="torch device for the model (cpu, cuda).")
    price_input_per_1k: float = Field(0.0, ge=0, description="$ per 1K prompt tokens (a local model costs 0 unless you price it, e.g. subq.costs.scaled_price).")
    price_output_per_1k: float = Field(0.0, ge=0, description="$ per 1K completion tokens.")

    def price(self) -> Price:
        return Price(self.price_input_per_1k, self.price_output_per_1k)


def follow_reserved_gpus(decomposer: DecomposerSettings, num_gpus: float) -> None:
    """The decomposer's device follows the GPUs Ray reserves for it (Serve replicas and `subq eval`'s actors alike):
    never an idle reserved GPU, nor a GPU used that Ray did not reserve. Sets device to cuda when GPUs are reserved
    and no device was given; ValueError on a contradiction."""
    cuda = decomposer.device.startswith("cuda")
    if num_gpus > 0 and not cuda:
        if "device" in decomposer.model_fields_set:
            raise ValueError("decomposer.device is cpu but decomposer_num_gpus > 0 (a reserved GPU left idle)")
        decomposer.device = "cuda"
    elif cuda and num_gpus == 0:
        raise ValueError("decomposer.device is cuda but decomposer_num_gpus is 0: Ray reserves no GPU for it")
