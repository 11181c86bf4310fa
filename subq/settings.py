"""How a solver and a decomposer are reached and decode: the settings shared by the Serve app, `subq eval`
and the demo (pydantic; no Ray, no torch)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from subq.costs import Price, PriceTable
from subq.errors import ConfigError
from subq.textformat import DEFAULT_MAX_NEW_TOKENS

# ---------------------------------------------------------------- settings

# Command-line names these settings had before `subq serve`/`subq eval` derived their flags from the config
# (`--beta` for `--decomposer-beta`, ...; `--solver-name` from when `solver.model` was `solver.name`): kept as
# declared aliases (subq.cli_options.config_command).
FLAG_ALIASES = {
    "solver.model": ["--solver-name"], "solver.api_key_env": ["--api-key-env"],
    "solver.price_input_per_1k": ["--solver-price-input"], "solver.price_output_per_1k": ["--solver-price-output"],
    "decomposer.beta": ["--beta"], "decomposer.max_new_tokens": ["--max-new-tokens"],
}



class EndpointSettings(BaseModel):
    """An OpenAI-compatible endpoint and how it is called (retries, limits, price): the teacher of `subq generate`
    (GenerateConfig has these fields flat) and the solver of `subq serve` / `subq eval` (SolverSettings). One price
    rule (`price`) and one client construction (`client_kwargs`) for both."""

    model: str = Field("gpt-3.5-turbo", description="Model name sent upstream; also the price-table key.")
    base_url: Optional[str] = Field(None, description="OpenAI-compatible endpoint (e.g. http://127.0.0.1:8300/v1); "
                                    "None = api.openai.com.")
    api_key_env: str = Field("OPENAI_API_KEY", description="NAME of the environment variable holding the key (the key "
                             "itself never goes in a config).")
    rpm: Optional[float] = Field(None, gt=0, description="Cluster-wide requests/minute cap (None: no cap; learned "
                                 "from the provider's x-ratelimit-limit-* headers).")
    tpm: Optional[float] = Field(None, gt=0, description="Cluster-wide tokens/minute cap (None: no cap).")
    max_retries: int = Field(6, ge=0, description="Retries per call for 429/5xx/timeouts/connection errors.")
    backoff_initial_s: float = Field(0.5, gt=0, description="Initial jittered exponential backoff (seconds).")
    backoff_max_s: float = Field(30.0, gt=0, description="Backoff cap (seconds).")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout (seconds).")
    max_retry_after_s: float = Field(120.0, gt=0, description="Longest Retry-After honoured (seconds); a longer "
                                     "one is capped and counted.")
    price_table: Optional[str] = Field(None, description="YAML price table (model: {input_per_1k, output_per_1k}) "
                                       "adding to / overriding subq.costs defaults.")
    price_input_per_1k: Optional[float] = Field(None, ge=0, description="Override the model's input price (USD/1K).")
    price_output_per_1k: Optional[float] = Field(None, ge=0, description="Override the model's output price (USD/1K).")

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, v):
        from urllib.parse import urlsplit

        if v is not None:
            try:
                u = urlsplit(v.strip())
            except ValueError:
                raise ValueError("not a URL") from None
            if u.username or u.password or "@" in (u.netloc or ""):
                # never echoed: the message names the field only
                raise ValueError("the base URL holds credentials (user:password@host); they would be written to "
                                 "actor names, config.yaml and logs: remove them and put the key in the variable "
                                 "named by --api-key-env")
        return v

    def _table(self) -> PriceTable:
        return PriceTable.load(self.price_table)

    def prices(self) -> PriceTable:
        """The price table with this endpoint's override: a side not overridden keeps the table's price (the one
        override rule, subq.costs.PriceTable.with_override). ConfigError naming `model` when it has no price."""
        table = self._table().with_override(self.model, self.price_input_per_1k, self.price_output_per_1k)
        table.price(self.model)
        return table

    def price(self) -> Price:
        return self.prices().price(self.model)

    def client_kwargs(self) -> dict:
        """actors.teacher.TeacherClient's arguments for this endpoint (the key is read there, from api_key_env)."""
        return dict(model=self.model, base_url=self.base_url, api_key_env=self.api_key_env, rpm=self.rpm,
                    tpm=self.tpm, max_retries=self.max_retries, backoff_initial_s=self.backoff_initial_s,
                    backoff_max_s=self.backoff_max_s, timeout_s=self.timeout_s,
                    max_retry_after_s=self.max_retry_after_s, price=self.price())


class SolverSettings(EndpointSettings):
    """How the solver (answerer) is reached. Shared by the Serve app and `subq eval`. `model` was called `name`
    before; `name` is still read from configs (and `solver.name` still answers in code)."""

    model_config = ConfigDict(populate_by_name=True)

    model: str = Field("gpt-3.5-turbo", validation_alias=AliasChoices("model", "name"),
                       description="Model name sent upstream (openai) or served id (local); also the price-table key.")
    backend: Literal["openai", "local"] = Field("openai", description="openai: any OpenAI-compatible endpoint via the openai SDK; local: an HF causal LM on this node.")
    local_path: Optional[str] = Field(None, description="HF checkpoint directory for backend=local.")
    prompt: Literal["paper", "doc"] = Field("paper", description="paper: GSM8K-AI-SubQ QA prompt ('Final answer:'); doc: Divide-or-Conquer solver prompt ('The answer is:').")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature (the paper evaluates at 0).")
    max_tokens: int = Field(500, gt=0, description="Max completion tokens per solver call (paper: 500).")
    max_retries: int = Field(4, ge=0, description="Retries on 429/5xx/timeouts before the call fails (then HTTP 502).")
    backoff_max_s: float = Field(5.0, gt=0, description="Backoff cap (seconds): a served request is waiting.")
    cache_dir: Optional[str] = Field(None, description="Durable request cache of solver replies (actors.teacher.RequestCache): a re-run pays nothing. `subq eval` default: <out>/cache.")

    @property
    def name(self) -> str:
        return self.model

    def _table(self) -> PriceTable:
        # a local backend's table price is 0 (it can still be priced with the overrides)
        return PriceTable({self.model: Price(0.0, 0.0)}) if self.backend == "local" else PriceTable.load(self.price_table)

    def prices(self) -> PriceTable:
        try:
            return super().prices()
        except ConfigError:
            raise ConfigError(f"no price for solver model {self.model!r}", field="solver.model",
                              hint="set solver.price_input_per_1k/price_output_per_1k (--solver-price-input/--solver-price-output) "
                                   "or solver.price_table") from None

    def client_kwargs(self) -> dict:
        return {**super().client_kwargs(), "cache_dir": self.cache_dir}

    def upstream(self) -> str:
        if self.backend == "local":
            return f"local:{self.local_path}"
        return self.base_url or "https://api.openai.com/v1"


class DecodingSettings(BaseModel):
    """How a distilled decomposer decodes: shared by `subq serve`, `subq eval` and the demo (DecomposerSettings).
    `beta` unset means the checkpoint's own `ilql.beta` everywhere (as training's validation decodes)."""

    beta: Optional[float] = Field(None, description="ILQL guidance weight (log pi + beta*(minQ - V)); None: the checkpoint's own ilql.beta (as in training's validation); ignored without heads; 0 = plain BC decoding.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature when do_sample.")
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, gt=0, le=4096, description="Max generated tokens per decomposition (the release allowed the reference length + 200).")


class DecomposerSettings(DecodingSettings):
    """The distilled decomposer: a local HF (BC/FBC) or ILQL checkpoint, and how it decodes."""

    path: Optional[str] = Field(None, description="Checkpoint directory (training's HF save, ILQL heads beside it). None: no distilled decomposer.")
    name: str = Field("subq-decomposer", description="Id under which it is listed on /v1/models and in reports.")
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
