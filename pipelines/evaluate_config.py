"""`EvalConfig`: every setting of `subq eval`, in one place. Its flags, the `--config` YAML and
`python -m pipelines.evaluate` all derive from it (subq.cli_options). Light imports only (pydantic), so the CLI
starts fast; the job itself is pipelines.evaluate."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from subq.settings import DecomposerSettings, SolverSettings, follow_reserved_gpus


class EvalConfig(BaseModel):
    """`subq eval`: evaluate decomposer x solver pairs over a split and write a report directory."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field("gsm8k:test", description="Split name (gsm8k:test, gsm8k-ai-subq:test) or a .jsonl/.json/.parquet path or URI.")
    limit: Optional[int] = Field(None, gt=0, description="Evaluate the first N problems only.")
    out: str = Field(..., description="Report directory (local path or pyarrow filesystem URI).")
    decomposers: list[str] = Field(default_factory=lambda: ["none"], description="'none' (single-stage), 'teacher' (the solver endpoint's QG), or NAME=CHECKPOINT_DIR / CHECKPOINT_DIR (distilled).")
    solver: SolverSettings = Field(default_factory=SolverSettings, description="The solver (answerer).")
    decomposer: DecomposerSettings = Field(default_factory=DecomposerSettings, description="Decoding settings for distilled decomposers (path comes from `decomposers`).")
    batch_size: int = Field(8, gt=0, description="Problems per Ray Data batch (decomposer batch size).")
    concurrency: int = Field(8, gt=0, description="Solver calls in flight per solver actor.")
    num_actors: int = Field(1, gt=0, description="Ray Data actors per stage.")
    decomposer_num_gpus: float = Field(0.0, ge=0, description="GPUs each distilled-decomposer actor reserves (as serving's decomposer_num_gpus); > 0 puts the model on cuda.")
    cache_dir: Optional[str] = Field(None, description="Durable cache of solver replies (default <out>/cache): a re-run, or a resumed killed run, only calls what is not cached.")
    exclude_few_shot: bool = Field(False, description="Drop the GSM8K test problems the paper's prompts quote as few-shot examples (kept and marked by default, as the release kept them).")


    @model_validator(mode="after")
    def _device_follows_gpus(self) -> "EvalConfig":
        follow_reserved_gpus(self.decomposer, self.decomposer_num_gpus)  # as serving
        return self
