"""The training job's config: one pydantic model, every field documented where declared; loads from YAML
(`subq train --config job.yaml`) with CLI flags overriding. Saved as `training_config.yaml` beside the model.

DeepSpeed: `deepspeed` is a preset name (`zero0`..`zero3`, files in training/deepspeed_configs/) or a path to a
DeepSpeed JSON config. Batch sizes, optimizer and bf16 are filled in by `deepspeed_config()`: the micro batch is
`batch_size`, `grad_accum` micro-steps make one optimizer step. bf16 `"auto"` means on when the worker's GPU
supports it (`torch.cuda.is_bf16_supported()`, decided on the worker), off on CPU; an explicit `true` is honoured
on CPU too (DeepSpeed's CPU accelerator runs bf16) and refused on a GPU without bf16. The optimizer is torch's
AdamW (`"torch_adam": true`) on CPU and GPU alike: DeepSpeed's FusedAdam/CPUAdam are compiled at start-up and
need nvcc / a C++ toolchain that cluster nodes do not have.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from subq.errors import ConfigError

POLICY_MODES = ("frozen", "shared")


@dataclass
class ILQLConfig:
    """ILQL hyperparameters (training/ilql.py has the losses; paper defaults)."""

    gamma: float = 0.999  # discount (paper: 0.999)
    tau: float = 0.9  # expectile of the V loss (paper: 0.9)
    cql_weight: float = 0.01  # weight of the CQL cross-entropy on Q logits (paper: 0.01)
    polyak: float = 0.005  # target-head Polyak rate per sync (paper: 0.005)
    td_weight: float = 1.0  # weight of the TD loss of the twin Q heads
    v_weight: float = 1.0  # weight of the expectile V loss
    lm_weight: float = 1.0  # weight of the LM (BC) loss kept during ILQL (0 = heads only)
    awac_temperature: float | None = None  # None: plain BC LM loss; else AWAC weights exp(adv / temperature)
    awac_max_weight: float = 20.0  # clip of the AWAC weights
    target_sync_every: int = 1  # optimizer steps between Polyak syncs (the rate is rescaled: polyak_rate)
    beta: float = 1.0  # guidance weight used by validation decoding (paper: 1)
    # "frozen" (release-faithful): the LM (policy) is frozen, the heads learn on its detached features; lm_weight
    # then has no effect. "shared" (trlx-style): Q/V/CQL gradients also flow into the LM, and lm_weight (the BC
    # loss) is the only thing anchoring the policy (lm_weight=0 lets it drift).
    policy: str = "frozen"

    def __post_init__(self):
        if self.policy not in POLICY_MODES:
            raise ValueError(f"ilql.policy must be one of {', '.join(POLICY_MODES)}, got {self.policy!r}")


DS_DIR = Path(__file__).parent / "deepspeed_configs"
PRESETS = {p.stem: p for p in sorted(DS_DIR.glob("*.json"))}


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # what to train
    algo: Literal["bc", "filtered_bc", "ilql"] = Field("bc", description="bc: SFT on every set; filtered_bc: only sets with answer_correctness >= filter_threshold; ilql: offline RL (training/ilql.py).")
    rewards: Literal["sparse", "dense"] = Field("sparse", description="ILQL rewards: sparse = answer_correctness on the final token; dense = + usefulness[i] on the last token of sub-question i.")
    data: str = Field(..., description="Training rows: subq Parquet (file/dir, any pyarrow URI) or the paper's json files (subq.schema.read_rows).")
    val_data: Optional[str] = Field(None, description="Validation rows (same formats). None: hold out val_fraction of the training problems.")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="Share of problems held out for validation when val_data is None (paper: 1%).")
    model: str = Field(..., description="Base model: an HF causal LM directory (e.g. from `subq init-model`), a .gguf file (converted once to an HF directory beside it; needs the 'student' extra) or a hub id already in the local cache. A path that does not exist fails at once.")
    init_from: Optional[str] = Field(None, description="Start from this checkpoint (e.g. a BC run's best/ or final/ dir) instead of `model`, as the paper does for FBC/ILQL; an ILQL checkpoint also brings its heads and target heads.")
    text_format: Literal["paper", "qlines"] = Field("paper", description="Decomposer text format (subq.textformat); saved so serving uses the same.")
    prompt_format: Literal["plain", "chat"] = Field("plain", description="plain: the text format's prompt (BOS if the tokenizer adds one); chat: that prompt as the user message of the tokenizer's chat template (instruct students). Saved so serving uses the same.")
    filter_threshold: float = Field(1.0, description="filtered_bc keeps sets with answer_correctness >= this (paper: 1).")
    max_length: int = Field(512, gt=8, description="Max tokens per example (prompt + sub-questions + EOS); the prompt is cut from the left, longer targets dropped.")
    # optimisation
    steps: int = Field(100, gt=0, description="Optimizer steps (paper: BC 40k, FBC 30k, ILQL 200k).")
    batch_size: int = Field(8, gt=0, description="Micro batch per worker (paper: BC 8, ILQL 4).")
    grad_accum: int = Field(1, gt=0, description="Micro batches per optimizer step (paper: BC 4, ILQL 8).")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (paper: 1e-4).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    seed: int = Field(0, description="Seed for data order, heads init and validation sampling.")
    ilql: ILQLConfig = Field(default_factory=ILQLConfig, description="ILQL hyperparameters (training/ilql.py; paper defaults).")
    # scale
    num_workers: int = Field(1, gt=0, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend, bf16 per the DeepSpeed config; False: CPU, gloo, DS_ACCELERATOR=cpu.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    deepspeed: str = Field("zero2", description="DeepSpeed config: preset zero0|zero1|zero2|zero3 or a JSON file path (batch/optimizer keys are filled in).")
    # outputs, checkpoints, validation
    name: str = Field("subq-train", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name: outputs go to <storage_path>/<name>/.")
    storage_path: str = Field("runs", description="Where runs are stored: local dir or pyarrow URI (s3://, gs://, ...); shared storage on multi-node clusters.")
    resume: bool = Field(False, description="Continue <storage_path>/<name> from its latest checkpoint (else an existing run dir is an error).")
    checkpoint_every: int = Field(50, gt=0, description="Optimizer steps between Ray Train checkpoints.")
    checkpoint_upload: Literal["async", "sync"] = Field(
        "async", description="async: training goes on while a checkpoint uploads to the storage path (Ray Train's "
        "CheckpointUploadMode.ASYNC; the local copy is removed once uploaded, and the run waits for the last upload "
        "before it ends); sync: each checkpoint step waits for its upload.")
    keep_checkpoints: int = Field(2, gt=0, description="Ray Train checkpoints kept (CheckpointConfig.num_to_keep).")
    max_failures: int = Field(0, ge=-1, description="Worker failures recovered from the latest checkpoint (FailureConfig; -1 = unlimited).")
    log_every: int = Field(10, gt=0, description="Optimizer steps between metric reports.")
    eval_every: int = Field(0, ge=0, description="Optimizer steps between validations (0: only at the end).")
    eval_problems: int = Field(16, ge=0, description="Validation problems decoded for BLEU / sub-question count (0: loss only).")
    startup_timeout_s: float = Field(900, ge=0, description="Seconds a worker may spend in DeepSpeed start-up (op build, process group) before the run fails naming the stage (0: no limit).")
    eval_max_new_tokens: int = Field(256, gt=0, description="Max new tokens when decoding validation problems (the release allowed the reference length + 200; val_no_eos_frac reports how many hit this budget).")

    @field_validator("deepspeed")
    @classmethod
    def _check_deepspeed(cls, v: str) -> str:
        if v not in PRESETS and not Path(v).is_file():
            raise ValueError(f"neither a preset ({', '.join(PRESETS)}) nor an existing JSON file: {v!r}")
        return v

    @property
    def label(self) -> str:
        """The run's name in reports: bc, filtered_bc, ilql-sparse or ilql-dense."""
        return f"ilql-{self.rewards}" if self.algo == "ilql" else self.algo

    def ilql_dict(self) -> dict:
        return asdict(self.ilql) if not isinstance(self.ilql, dict) else dict(self.ilql)


def _read_ds(cfg: TrainConfig) -> dict:
    src = PRESETS.get(cfg.deepspeed, Path(cfg.deepspeed))
    try:
        return json.loads(Path(src).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read DeepSpeed config: {e}", field="deepspeed", source=str(src)) from e


def bf16_requested(cfg: TrainConfig) -> bool | str:
    """The DeepSpeed config's bf16.enabled as written: True, False or "auto"."""
    v = (_read_ds(cfg).get("bf16") or {}).get("enabled", False)
    return "auto" if v == "auto" else bool(v)


def gpu_bf16_supported() -> bool:
    """Whether this process's GPU does bf16 (Ampere or newer); False without a GPU."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def deepspeed_config(cfg: TrainConfig, world_size: int, bf16_supported: bool | None = None) -> dict:
    """The DeepSpeed config dict for this run (preset or file + our batch sizes, optimizer, bf16).
    bf16_supported: whether the GPU does bf16 (None: ask torch here; the driver may have no GPU, so workers
    pass what they see and the driver's pre-flight checks the cluster's GPU types)."""
    ds = _read_ds(cfg)
    src = cfg.deepspeed
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ZeRO stage {stage} is not 0-3", field="deepspeed.zero_optimization.stage", source=str(src))
    bf16 = (ds.get("bf16") or {}).get("enabled", False)
    if cfg.use_gpu and (bf16 is True or bf16 == "auto"):
        supported = gpu_bf16_supported() if bf16_supported is None else bf16_supported
        if bf16 is True and bf16_supported is not None and not supported:
            raise ConfigError("bf16 is enabled but this GPU does not support it (needs compute capability 8.0+)",
                              field="deepspeed.bf16.enabled", hint='set it to "auto" (fp32 on such GPUs) or false')
        bf16 = supported if bf16 == "auto" else True
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": bool(bf16) if bf16 != "auto" else False}
    if not cfg.use_gpu:
        ds.pop("fp16", None)  # fp16 loss scaling is a GPU feature
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * world_size
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = ds["optimizer"].setdefault("params", {})
    params.update({"lr": cfg.lr, "weight_decay": cfg.weight_decay})
    if ds["optimizer"].get("type", "").lower() in ("adam", "adamw"):
        params.setdefault("torch_adam", True)  # FusedAdam/CPUAdam are JIT-compiled (nvcc / C++ toolchain)
    ds.setdefault("steps_per_print", 10**6)
    return ds


def zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))
