"""Checkpoints of a training run: DeepSpeed checkpoints reported to Ray Train by a helper thread, and the final\nHF-format save from the fp32 master weights gathered from the optimizer's shards (every ZeRO stage; a frozen\npolicy keeps its original fp32 weights)."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from subq import storage
from training.config import (
    TrainConfig, run_dir,
)


class _CheckpointWriter:
    """Rank 0's best/ writes, done by one helper thread from a CPU copy of the weights, so that building the HF
    model, serializing it and uploading it to the storage path never stall the training loop; a newer best/
    supersedes one not started yet; a failed write is raised in the loop (next submit, or close)."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.pending = ThreadPoolExecutor(1, thread_name_prefix="subq-best"), []

    def submit(self, job) -> None:
        for f in self.pending:
            f.cancel()  # not started yet: superseded by this newer best/
        self.pending = [f for f in self.pending if not f.cancelled()]
        for f in [f for f in self.pending if f.done()]:
            self.pending.remove(f)
            f.result()
        self.pending.append(self.pool.submit(job))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        pending, self.pending = self.pending, []
        for f in pending:
            if not f.cancelled():
                f.result()


def _fp32_state_dict(engine, rank: int, skip_prefix: str | None = None) -> dict | None:
    """The full fp32 master weights (the optimizer's copy, not the bf16 compute copy) on rank 0, through
    DeepSpeed's public `safe_get_full_fp32_param` (ZeRO 1-3 and the bf16 optimizer); parameters without an
    optimizer copy (fp32 without ZeRO) are the parameters themselves, gathered under ZeRO-3. skip_prefix: names
    left out (a frozen policy: its compute copy may be bf16; the original is read from the model files instead).
    Every rank must call it (collectives); other ranks get None."""
    import contextlib

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        if skip_prefix and name.startswith(skip_prefix):
            continue
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext():
                full = p.detach().clone()
        if rank == 0:
            out[name] = full.float().cpu()
    return out if rank == 0 else None


def _original_lm_state(cfg: TrainConfig) -> dict:
    """The frozen policy's weights as the model files hold them, fp32 (read once, on rank 0): under bf16 the
    engine's copy of a frozen LM is bf16-rounded and has no fp32 master."""
    import torch
    from transformers import AutoModelForCausalLM

    base = cfg.init_from or cfg.model
    if base not in _ORIGINAL_LM:
        lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        _ORIGINAL_LM.clear()
        _ORIGINAL_LM[base] = {k: v.detach() for k, v in lm.named_parameters()}
    return _ORIGINAL_LM[base]


def _frozen_policy(cfg: TrainConfig) -> bool:
    return cfg.algo == "ilql" and cfg.ilql_dict().get("policy", "frozen") == "frozen"


def _save_final(engine, tok, cfg: TrainConfig, target, stage: int, rank: int, dest_name: str = "final",
                info: dict | None = None, writer: "_CheckpointWriter | None" = None) -> None:
    """Consolidate the fp32 master weights (every ZeRO stage, bf16 or not; a frozen policy: its original fp32
    weights) on rank 0 (collective: every rank takes part) and save HF format to <run>/<dest_name> (final/ or
    best/), with checkpoint.json = info. writer: the write is done by its helper thread from the CPU copy."""
    import functools

    frozen = _frozen_policy(cfg)
    sd = _fp32_state_dict(engine, rank, skip_prefix="lm." if frozen else None)
    if rank != 0:
        return
    if frozen:
        sd.update({f"lm.{k}": v for k, v in _original_lm_state(cfg).items()})
    module = engine.module
    heads = (module.heads.hidden_size, module.heads.vocab_size) if module.heads is not None else None
    target_sd = {k: v.detach().float().cpu().clone() for k, v in target.state_dict().items()} \
        if target is not None else None
    job = functools.partial(_write_model_dir, sd, module.lm.config, tok, cfg, heads, target_sd, dest_name, info)
    if writer is None:
        job()
    else:
        writer.submit(job)


def _write_model_dir(sd: dict, lm_config, tok, cfg: TrainConfig, heads: tuple | None, target_sd: dict | None,
                     dest_name: str, info: dict | None) -> None:
    """Rank 0: the consolidated fp32 state dict -> HF model directory <run>/<dest_name> (+ ILQL heads, training
    config, checkpoint.json); plain CPU work and storage writes (safe in a helper thread)."""
    import types

    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from training.decomposer import CONFIG_FILE
    from training.ilql import save_heads
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # rank 0 alone builds the plain model below: no zero.Init (a collective)
    lm_sd = {k[3:]: v for k, v in sd.items() if k.startswith("lm.")}
    fresh = AutoModelForCausalLM.from_config(lm_config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict({k: v.float() for k, v in lm_sd.items()}, strict=False)
    params = {k for k, _ in fresh.named_parameters()}  # tied duplicates (lm_head.weight) are not listed here
    tied = (set(fresh.state_dict()) - params) | (params - set(lm_sd))
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"consolidated state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    with tempfile.TemporaryDirectory() as d:
        fresh.save_pretrained(d)
        tok.save_pretrained(d)
        if heads is not None:
            heads_sd = {k[6:]: v for k, v in sd.items() if k.startswith("heads.")}
            save_heads(d, types.SimpleNamespace(hidden_size=heads[0], vocab_size=heads[1]), None, state=heads_sd,
                       target_state=target_sd)
        saved = cfg.model_dump()
        Path(d, CONFIG_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
        Path(d, "checkpoint.json").write_text(json.dumps({"kind": dest_name, **(info or {})}))
        dest = storage.join(run_dir(cfg), dest_name)
        for f in sorted(Path(d).iterdir()):
            storage.write_bytes_atomic(storage.join(dest, f.name), f.read_bytes())


def _checkpoint_zero_stage(ckpt) -> int | None:
    """The ZeRO stage a Ray Train checkpoint was written with (its trainer_state.pt alone is read), or None."""
    if ckpt is None:
        return None
    import torch

    try:
        with ckpt.filesystem.open_input_file(f"{ckpt.path.rstrip('/')}/trainer_state.pt") as fh:
            data = fh.read()
    except (FileNotFoundError, OSError):
        return None
    stage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True).get("zero_stage")
    return int(stage) if stage is not None else None


_ORIGINAL_LM: dict = {}
