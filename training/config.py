"""The training job's config: one pydantic model, every field documented where declared; loads from YAML
(`subq train --config job.yaml`) with CLI flags overriding. Saved as `training_config.yaml` beside the model.

DeepSpeed: `deepspeed` is `auto` (the default: the ZeRO stage chosen on the workers from the model's size, the world
size and the GPU's memory, `choose_zero_stage`), a preset name (`zero0`..`zero3`, files in
training/deepspeed_configs/) or a path to a DeepSpeed JSON config. Batch sizes, optimizer and precision are filled in
by `deepspeed_config()`: the micro batch is `batch_size`, `grad_accum` micro-steps make one optimizer step.
bf16 `"auto"` means on only where the worker's GPU computes bf16 natively (compute capability 8.0+: `native_bf16`;
torch's `is_bf16_supported()` also says yes for GPUs that merely emulate it, e.g. T4 and V100), fp32 on other GPUs
(fp16 when the config's `fp16.enabled` is true) and off on CPU; an explicit `true` is honoured on CPU too
(DeepSpeed's CPU accelerator runs bf16) and refused on a GPU without native bf16. `gpu_precision` says which
precision a run uses and why (logged in the run's metrics as `precision`). The optimizer is torch's AdamW
(`"torch_adam": true`) on CPU and GPU alike: DeepSpeed's FusedAdam/CPUAdam are compiled at start-up and need nvcc /
a C++ toolchain that cluster nodes do not have.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from subq.errors import ConfigError
from subq.textformat import DEFAULT_MAX_NEW_TOKENS

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
    # optimizer steps between Polyak syncs (the rate is rescaled: polyak_rate). 1 = the release: both ILQL releases
    # (Snell et al.: alpha 0.005, hard_update_every null; Tarasov & Shridhar: soft_update(tau=0.005) after every
    # opt.step(), i.e. every 8 micro-batches) sync once per optimizer step; trlx syncs every 5 steps at 0.001.
    target_sync_every: int = 1
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
    node_wait_s: float = Field(900, gt=0, description="Seconds pre-flight waits for the autoscaler to launch the nodes the workers need (e.g. GPU node types at min_workers 0) before the run fails (training/preflight.py).")
    deepspeed: str = Field("auto", description="DeepSpeed config: auto (the lowest ZeRO stage whose model states fit half a GPU's memory: ZeRO-0 for a model that fits one GPU, whatever the world size), preset zero0|zero1|zero2|zero3, or a JSON file path (batch/optimizer keys are filled in).")
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
    eval_problems: Optional[int] = Field(None, ge=0, description="Validation problems decoded for BLEU / sub-question count (None: the whole validation set, as the release; 0: loss only); split across the ranks.")
    startup_timeout_s: float = Field(900, ge=0, description="Seconds a worker may spend in DeepSpeed start-up (process group, engine set-up) before the run fails naming the stage (0: no limit).")
    eval_max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, gt=0, description="Max new tokens when decoding validation problems (the same default as serving and evaluation, subq.settings.DecodingSettings; the release allowed the reference length + 200; val_no_eos_frac reports how many hit this budget).")

    @field_validator("deepspeed")
    @classmethod
    def _check_deepspeed(cls, v: str) -> str:
        if v != "auto" and v not in PRESETS and not Path(v).is_file():
            raise ValueError(f"neither auto, a preset ({', '.join(PRESETS)}) nor an existing JSON file: {v!r}")
        return v

    @property
    def label(self) -> str:
        """The run's name in reports: bc, filtered_bc, ilql-sparse or ilql-dense."""
        return f"ilql-{self.rewards}" if self.algo == "ilql" else self.algo

    def ilql_dict(self) -> dict:
        return asdict(self.ilql) if not isinstance(self.ilql, dict) else dict(self.ilql)


def _read_ds(cfg: TrainConfig, stage: int | None = None) -> dict:
    """The DeepSpeed config as written: the file, the preset, or for `auto` the preset of `stage` (zero0 when the
    stage is not decided yet, e.g. on the driver: the presets differ only in their ZeRO stage)."""
    src = PRESETS[f"zero{stage or 0}"] if cfg.deepspeed == "auto" else PRESETS.get(cfg.deepspeed, Path(cfg.deepspeed))
    try:
        return json.loads(Path(src).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read DeepSpeed config: {e}", field="deepspeed", source=str(src)) from e


def bf16_requested(cfg: TrainConfig) -> bool | str:
    """The DeepSpeed config's bf16.enabled as written: True, False or "auto"."""
    v = (_read_ds(cfg).get("bf16") or {}).get("enabled", False)
    return "auto" if v == "auto" else bool(v)


NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere (A100 8.0, A10G 8.6), Ada (L4 8.9), Hopper (H100 9.0), ...


def native_bf16(device=None) -> bool:
    """Whether this process's GPU computes bf16 natively (compute capability >= 8.0); False without a GPU.
    torch.cuda.is_bf16_supported() is True on T4 (7.5) and V100 (7.0) too, which only emulate it (slowly): the
    one test every caller (training, serving, doctor) uses."""
    import torch

    if not torch.cuda.is_available():
        return False
    if torch.version.hip:  # ROCm: torch's own answer (no CUDA compute capability)
        return bool(torch.cuda.is_bf16_supported())
    return tuple(torch.cuda.get_device_capability(device)) >= NATIVE_BF16_CAPABILITY


def _gpu_visible() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def gpu_bf16_supported() -> bool:
    """Kept for callers of the old name: native_bf16()."""
    return native_bf16()


def gpu_precision(ds: dict, device=None) -> tuple[str, str]:
    """(precision, why) of a resolved DeepSpeed config on this process's device: "bf16", "fp16" or "fp32", and a
    line naming the GPU and its compute capability (or the CPU), for the run's log and metrics."""
    import torch

    p = "bf16" if (ds.get("bf16") or {}).get("enabled") is True else \
        "fp16" if (ds.get("fp16") or {}).get("enabled") is True else "fp32"
    if not torch.cuda.is_available():
        return p, f"{p} on CPU"
    name = torch.cuda.get_device_name(device)
    cap = "{}.{}".format(*torch.cuda.get_device_capability(device))
    native = native_bf16(device)
    why = f"{p} on {name} (compute capability {cap}: {'native bf16' if native else 'no native bf16, needs 8.0'})"
    return p, why


def deepspeed_config(cfg: TrainConfig, world_size: int, bf16_supported: bool | None = None,
                     stage: int | None = None) -> dict:
    """The DeepSpeed config dict for this run (preset or file + our batch sizes, optimizer, precision).
    bf16_supported: whether the GPU computes bf16 natively (None: ask torch here, `native_bf16`; the driver may have
    no GPU, so workers decide and the driver's pre-flight checks the cluster's GPU types). stage: the ZeRO stage
    chosen for `deepspeed: auto` (choose_zero_stage; None: zero0, e.g. for the driver's validation)."""
    ds = _read_ds(cfg, stage)
    src = cfg.deepspeed
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ZeRO stage {stage} is not 0-3", field="deepspeed.zero_optimization.stage", source=str(src))
    bf16 = (ds.get("bf16") or {}).get("enabled", False)
    fp16 = (ds.get("fp16") or {}).get("enabled", False) is True
    if cfg.use_gpu and (bf16 is True or bf16 == "auto"):
        supported = native_bf16() if bf16_supported is None else bf16_supported
        # asked here without a GPU (the driver on a CPU head node): not refused here, the pre-flight checks the
        # cluster's GPU types and each worker decides on its own GPU
        judged = bf16_supported is not None or _gpu_visible()
        if bf16 is True and judged and not supported:
            raise ConfigError("bf16 is enabled but this GPU has no native bf16 (needs compute capability 8.0+)",
                              field="deepspeed.bf16.enabled", hint='set it to "auto" (fp32 on such GPUs) or false')
        bf16 = (supported and not fp16) if bf16 == "auto" else True  # an explicit fp16 wins over "auto"
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": bool(bf16) if bf16 != "auto" else False}
    if not cfg.use_gpu:
        ds.pop("fp16", None)  # fp16 loss scaling is a GPU feature
    elif bf16 is True and fp16:
        raise ConfigError("bf16 and fp16 are both enabled", field="deepspeed.fp16.enabled",
                          hint="enable one of them")
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


# ---------------------------------------------------------------- ZeRO stage for `deepspeed: auto`

STATE_FRACTION = 0.5  # share of a GPU's memory the model states may take; the rest: activations (ILQL's logits and
#                       two Q outputs of batch x length x vocab each), the CUDA context, allocator fragmentation


def model_state_bytes(trainable: int, frozen: int, stage: int, world: int, precision: str) -> int:
    """Bytes of model states per GPU (the ZeRO paper's accounting, Adam): per trainable parameter, mixed precision
    (bf16/fp16) keeps 2 B weights + 2 B gradients + 12 B optimizer (fp32 master, momentum, variance); fp32 keeps
    4 + 4 + 8. ZeRO-1 shards the optimizer states over `world` ranks, ZeRO-2 also the gradients, ZeRO-3 also the
    weights. Frozen parameters keep only their weights (sharded under ZeRO-3)."""
    w, g, o = (2, 2, 12) if precision in ("bf16", "fp16") else (4, 4, 8)
    n = max(1, world)
    per = {0: (w + g + o) * trainable, 1: (w + g) * trainable + o * trainable // n,
           2: w * trainable + (g + o) * trainable // n, 3: (w + g + o) * trainable // n}[stage]
    return per + (w * frozen // n if stage == 3 else w * frozen)


def choose_zero_stage(trainable: int, frozen: int, world: int, gpu_bytes: int, precision: str,
                      fraction: float = STATE_FRACTION) -> tuple[int, str]:
    """(stage, why): the lowest ZeRO stage whose model states fit `fraction` of one GPU's memory. A model that fits
    one GPU gets ZeRO-0 on any world size: ZeRO-0/1 all-reduce gradients once per optimizer step, ZeRO-2
    reduce-scatters them at every micro-step (grad_accum x more gradient traffic) and ZeRO-3 also all-gathers the
    weights in every forward and backward; across nodes on 10-25 Gbps that traffic is the step time. When no stage
    fits, ZeRO-3 (the least memory) and the reason says so."""
    budget = int(gpu_bytes * fraction)
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    for stage in (0, 1, 2, 3):
        need = model_state_bytes(trainable, frozen, stage, world, precision)
        if need <= budget:
            return stage, (f"ZeRO-{stage}: {gb(need)} of model states per GPU ({trainable / 1e6:.0f}M trainable + "
                           f"{frozen / 1e6:.0f}M frozen parameters, {precision}, {world} ranks) fit "
                           f"{fraction:.0%} of {gb(gpu_bytes)}")
    need = model_state_bytes(trainable, frozen, 3, world, precision)
    return 3, (f"ZeRO-3: even sharded over {world} ranks the model states take {gb(need)} per GPU, more than "
               f"{fraction:.0%} of {gb(gpu_bytes)}: add workers or use a smaller model")


def run_dir(cfg: TrainConfig) -> str:
    """Where a run keeps its checkpoints, metrics and final model: `<storage_path>/<name>` (local path or URI)."""
    from subq import storage

    return storage.join(cfg.storage_path, cfg.name)
