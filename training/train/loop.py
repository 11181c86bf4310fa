"""The per-worker training loop (Ray Train's train_loop_per_worker): a DeepSpeed engine per worker, a flat loop\n(forward, loss, backward, step, Polyak sync), periodic metrics and checkpoints, validation split across ranks."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from subq.errors import DataError
from training.config import (
    TrainConfig, choose_zero_stage, deepspeed_config, gpu_precision, native_bf16, run_dir, zero_stage,
)
from training.train.checkpoints import _CheckpointWriter, _checkpoint_zero_stage, _frozen_policy, _save_final
from training.train.metrics import _MetricsWriter
from training.train.runtime import network_defaults, run_stage


FAULT_ENV = "SUBQ_TRAIN_FAULT_AT_STEP"  # tests: rank 1 exits at this optimizer step on the first attempt


def _build_module(cfg: TrainConfig, tokenizer):
    """(the engine's module: the LM, plus ILQL heads (V, twin Q) for ilql; the saved target heads of an ILQL
    init_from, else None). ilql policy=frozen: the LM gets no gradient."""
    import torch
    import torch.nn as nn
    from transformers import AutoModelForCausalLM

    from training.ilql import ILQLHeads, load_heads, HEADS_FILE

    base = cfg.init_from or cfg.model
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    frozen = cfg.algo == "ilql" and cfg.ilql_dict().get("policy", "frozen") == "frozen"

    class Policy(nn.Module):
        def __init__(self, lm, heads):
            super().__init__()
            self.lm, self.heads = lm, heads

        def forward(self, input_ids, attention_mask):
            if frozen:
                self.lm.eval()  # no dropout: the heads learn on the features decoding will see
            with torch.no_grad() if frozen else contextlib.nullcontext():  # frozen: heads learn on fixed features
                out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                              output_hidden_states=self.heads is not None, use_cache=False)
            if self.heads is None:
                return out.logits, None, None, None, None
            h = out.hidden_states[-1]
            q1, q2, v = self.heads(h.to(self.heads.v_head[0].weight.dtype))
            return out.logits, h, q1, q2, v

    heads = target = None
    if cfg.algo == "ilql":
        torch.manual_seed(cfg.seed)
        if frozen:
            lm.requires_grad_(False)
        if cfg.init_from and (Path(cfg.init_from) / HEADS_FILE).exists():
            heads, target = load_heads(cfg.init_from)  # an ILQL checkpoint: its target heads come back too
            heads.train()
        else:
            emb = lm.get_output_embeddings().weight
            vocab = emb.ds_shape[0] if hasattr(emb, "ds_shape") else emb.shape[0]  # ZeRO-3: partitioned at init
            heads = ILQLHeads(lm.config.hidden_size, vocab)
    return Policy(lm, heads), target


def train_loop(loop_cfg: dict) -> None:
    """Per-worker loop (Ray Train calls it on every rank)."""
    cfg = TrainConfig.model_validate(loop_cfg["cfg"])
    from training.preflight import fetch_model

    cfg = cfg.model_copy(update={k: fetch_model(getattr(cfg, k)) for k in ("model", "init_from")
                                 if getattr(cfg, k) and "://" in getattr(cfg, k)})  # URI -> this node's copy
    os.environ["DS_ACCELERATOR"] = "cuda" if cfg.use_gpu else "cpu"  # before deepspeed is imported
    from training.ds_ops import use_own_extensions_dir

    use_own_extensions_dir()  # this environment's own JIT op builds (not ~/.cache, shared by every install)
    import deepspeed
    import ray.train
    import torch
    from ray.train import Checkpoint, CheckpointUploadMode
    from ray.train.torch import get_device
    from transformers import AutoTokenizer

    from subq.textformat import get_format
    from training.bc import bc_loss
    from training.data import (batches, collate, encode, read_training_rows, select_examples, split_problems,
                               val_problems)
    from training.ilql import ILQLConfig, TargetQHeads, ilql_losses, polyak_rate, polyak_update

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device() if cfg.use_gpu else torch.device("cpu")  # Ray Train set CUDA_VISIBLE_DEVICES, LOCAL_RANK
    if cfg.use_gpu:
        network_defaults(os.environ, True)  # before NCCL sets up its first communicator (lazily, at a collective)
        torch.cuda.set_device(device)  # this thread's device (deepspeed.initialize runs in a helper thread)
    torch.manual_seed(cfg.seed)
    fmt = get_format(cfg.text_format)
    ilql_cfg = ILQLConfig(**cfg.ilql_dict())
    upload_mode = CheckpointUploadMode.ASYNC if cfg.checkpoint_upload == "async" else CheckpointUploadMode.SYNC

    # data
    tok = AutoTokenizer.from_pretrained(cfg.init_from or cfg.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # validation decoding pads prompts on the left (training batches: collate, right)
    rows = read_training_rows(cfg.data)
    train_rows, val_rows = (rows, read_training_rows(cfg.val_data, "val_data")) if cfg.val_data else \
        split_problems(rows, cfg.val_fraction)
    examples, _ = select_examples(train_rows, cfg.algo, cfg.rewards, cfg.filter_threshold, cfg.data)
    reward_mode = cfg.rewards if cfg.algo == "ilql" else None
    encoded = [e for e in (encode(x, tok, fmt, cfg.max_length, reward_mode, cfg.prompt_format) for x in examples)
               if e is not None]
    if not encoded:
        raise DataError(f"every example is longer than max_length={cfg.max_length}", field="max_length")
    val_sel, _ = select_examples(val_rows, "bc", "sparse") if val_rows else ([], {})
    val_encoded = [e for e in (encode(x, tok, fmt, cfg.max_length, None, cfg.prompt_format) for x in val_sel)
                   if e is not None]
    val_probs = val_problems(val_rows, cfg.eval_problems)

    # engine: precision (bf16 only on native bf16) and ZeRO stage (`auto`: from the model's size, the world size and
    # the smallest rank's memory), then deepspeed.initialize; every stage that may hang runs under a time limit
    from training.ds_ops import clear_stale_locks, lock_hint, skip_unused_cpu_ops, stage_timeout

    clear_stale_locks()  # a lock left by a killed op build would make this rank wait forever
    if not cfg.use_gpu:
        skip_unused_cpu_ops()  # no 70-110 s build of an op only tensor-parallel inference uses
    with stage_timeout("DeepSpeed init_distributed (process group)", cfg.startup_timeout_s,
                       hint=lock_hint):
        deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")  # adopts Ray Train's group
    net_hint = _network_hint if cfg.use_gpu else lock_hint
    # the first collective (NCCL sets up its communicator here): the smallest rank's memory, for `auto`
    memory = run_stage("first collective (process group set-up; NCCL on GPUs)", cfg.startup_timeout_s,
                       _min_over_ranks, _rank_memory(cfg, ctx, device), device, world, hint=net_hint)
    bf16_native = native_bf16(device) if cfg.use_gpu else None
    chosen, zero_why = None, f"ZeRO stage from the DeepSpeed config ({cfg.deepspeed})"
    resumed_stage = _checkpoint_zero_stage(ray.train.get_checkpoint()) if cfg.deepspeed == "auto" else None
    if resumed_stage is not None:  # a resumed run keeps its ZeRO stage (the shards are per stage)
        chosen, zero_why = resumed_stage, f"ZeRO-{resumed_stage}: the stage of the checkpoint resumed from"
    elif cfg.deepspeed == "auto":
        trainable, frozen_n = _param_counts(cfg)
        first = gpu_precision(deepspeed_config(cfg, world, bf16_native, stage=0), device if cfg.use_gpu else None)[0]
        chosen, zero_why = choose_zero_stage(trainable, frozen_n, world, memory, first)
    ds_cfg = deepspeed_config(cfg, world, bf16_native, stage=chosen)
    stage = zero_stage(ds_cfg)
    precision, precision_why = gpu_precision(ds_cfg, device if cfg.use_gpu else None)
    bf16 = precision == "bf16"
    if rank == 0:
        print(f"subq train: {precision_why}; {zero_why}", flush=True)
    if stage == 3:  # from_pretrained then builds the LM under deepspeed.zero.Init: each rank holds only its shard
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_cfg = HfDeepSpeedConfig(ds_cfg)  # noqa: F841 (transformers keeps a weakref; keep it alive)
    module, target = _build_module(cfg, tok)
    if stage == 3:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # built; later plain models (validation replica, saves) are not zero.Init'ed
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if module.heads is not None and stage == 3 and half is not None:
        # the LM was built in bf16/fp16 under zero.Init; ZeRO-3 neither casts the heads nor accepts mixed dtypes
        module.heads.to(half)
    # fp32 target heads (restored from an ILQL init_from, else copied before ZeRO-3 partitions the online heads);
    # they stay outside the engine
    if module.heads is not None:
        target = (target if target is not None else TargetQHeads(module.heads)).float().to(device)

    def initialize():
        if cfg.use_gpu:
            torch.cuda.set_device(device)
        return deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
                                    config=ds_cfg)

    engine, _, _, _ = run_stage("deepspeed.initialize (weights broadcast or partitioned over NCCL/gloo)",
                                cfg.startup_timeout_s, initialize, hint=net_hint)

    # resume
    start_step, history = 0, []
    best = {"step": None, "val_bleu": float("-inf")}  # the release keeps the checkpoint with the best val BLEU
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="ds", load_module_strict=True)
            # weights_only: a writable storage path must not mean code execution on every worker
            state = torch.load(Path(d) / "trainer_state.pt", map_location="cpu", weights_only=True)
        start_step, history = state["step"], state["history"]
        best = state.get("best") or best
        if target is not None:
            target.load_state_dict(state["target"])
    resumed_from = start_step
    fault_at = int(loop_cfg["fault_at_step"]) if loop_cfg.get("fault_at_step") else None

    data = batches(encoded, cfg.batch_size, rank, world, cfg.seed, start_batch=start_step * cfg.grad_accum)
    sync_rate = polyak_rate(ilql_cfg.polyak, ilql_cfg.target_sync_every)
    writer = _MetricsWriter(run_dir(cfg)) if rank == 0 else None
    best_writer = _CheckpointWriter() if rank == 0 else None  # best/ written off the loop (a CPU copy)
    replica: dict = {}  # ZeRO-3: the plain model validation decodes with (built once, refreshed per validation)
    t0, tokens, window = time.perf_counter(), 0, []
    step = start_step
    while step < cfg.steps:
        engine.train()
        for _ in range(cfg.grad_accum):
            items = next(data)
            tokens += sum(len(x["input_ids"]) for x in items)  # from the host lists: no device sync
            b = {k: v.to(device, non_blocking=True) for k, v in collate(items, tok.pad_token_id).items()}
            logits, h, q1, q2, v = engine(b["input_ids"], b["attention_mask"])
            if cfg.algo == "ilql":
                tq = target.action_values(h[:, :-1].detach(), b["input_ids"][:, 1:])  # the actions' target Q only
                loss, stats = ilql_losses(logits, q1, q2, tq, None, v, b["input_ids"], b["target_mask"],
                                          b["rewards"], ilql_cfg, host_stats=False)
            else:
                loss = bc_loss(logits, b["input_ids"], b["target_mask"])
                stats = {"loss": loss.detach()}
            engine.backward(loss)
            engine.step()
            window.append(stats)  # device tensors: read once per logging step
        step += 1
        if target is not None and step % ilql_cfg.target_sync_every == 0:
            polyak_update(target, engine.module.heads, sync_rate)
        if fault_at is not None and step == fault_at and rank == 1 and resumed_from == 0:
            os._exit(1)  # test hook: a worker dies mid-training on the first attempt only

        last = step == cfg.steps
        do_eval = last or (cfg.eval_every and step % cfg.eval_every == 0)
        do_ckpt = last or step % cfg.checkpoint_every == 0
        if not (do_eval or do_ckpt or step % cfg.log_every == 0):
            continue
        elapsed = time.perf_counter() - t0
        keys = list(window[0])
        means = torch.stack([torch.stack([s[k].float() for k in keys]) for s in window]).mean(0)
        if world > 1:  # every rank logs here at the same steps: the logged losses are the mean over all ranks'
            import torch.distributed as dist  # micro-batches (the global batch), not rank 0's shard alone

            dist.all_reduce(means)
            means = means / world
        metrics = dict(zip(keys, means.tolist()))  # the one device->host copy of this logging step
        metrics.update(step=step, tokens_per_s_rank=tokens / max(elapsed, 1e-9), resumed_from_step=resumed_from,
                       world_size=world, zero_stage=stage, bf16=bool(bf16), precision=precision)
        window, tokens, t0 = [], 0, time.perf_counter()
        if do_eval:
            metrics.update(_validate(engine, tok, fmt, val_encoded, val_probs, cfg, target, stage, device, rank, world,
                                     replica))
        history.append(metrics)
        if _improves_best(metrics, best, device):
            best = {"step": step, "val_bleu": float(metrics["val_bleu"])}
            _save_final(engine, tok, cfg, target, stage, rank, dest_name="best", info=best, writer=best_writer)
        metrics["best_step"] = best["step"]
        if writer is not None:
            writer.submit(history)  # json/csv/png written by a helper thread, off the training loop
        if do_ckpt:
            # a fresh local directory per checkpoint; Ray removes it once uploaded (async: in the background, while
            # training goes on; the run's end waits for the last upload)
            d = tempfile.mkdtemp(prefix="subq-ckpt-")
            engine.save_checkpoint(d, tag="ds")
            if rank == 0:
                torch.save({"step": step, "history": history, "best": best, "zero_stage": stage,
                            "target": target.state_dict() if target is not None else None},
                           Path(d) / "trainer_state.pt")
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_upload_mode=upload_mode,
                             delete_local_checkpoint_after_upload=True)
        else:
            ray.train.report(metrics)

    if best_writer is not None:
        best_writer.close()  # the last best/ is written (and a write error surfaces) before final/
    _save_final(engine, tok, cfg, target, stage, rank,
                info={"step": step, "best_step": best["step"], "precision": precision, "precision_reason": precision_why,
                      "zero_stage": stage, "zero_stage_reason": zero_why})
    if writer is not None:
        writer.close()  # the last metrics files are written (and a write error surfaces) before the run ends


def _improves_best(metrics: dict, best: dict, device) -> bool:
    """Whether this validation's BLEU beats the best so far (ties keep the earlier step). Rank 0 decides and
    broadcasts, so every rank takes part in the (ZeRO-3 collective) save or none does."""
    import torch
    import torch.distributed as dist

    if "val_bleu" not in metrics:  # every rank validates alike: no broadcast (a host sync) at plain log steps
        return False
    better = float(metrics["val_bleu"]) > best["val_bleu"]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([int(better)], device=device)
        dist.broadcast(flag, 0)
        better = bool(flag.item())
    return better


def rank_share(items: list, rank: int, world: int) -> list:
    """This rank's share of the validation set: every world-th item from `rank` (sizes differ by at most one)."""
    return items[rank::world]


def _eval_module(engine, stage: int, replica: dict, device):
    """The module validation runs on. Below ZeRO-3 every rank holds all weights: the engine's own module. Under
    ZeRO-3 a plain replica on this rank's device (compute dtype, built once), refreshed by one gather per parameter:
    decoding then needs no collective per token, so each rank decodes only its share and stops when its own
    problems are done (the engine's module would need every rank in every forward: fixed steps in lockstep)."""
    if stage != 3:
        return engine.module
    import deepspeed
    import torch.nn as nn
    from transformers import AutoModelForCausalLM

    from training.ilql import ILQLHeads

    src = engine.module
    if "module" not in replica:
        dtype = next(src.lm.parameters()).dtype
        holder = nn.Module()
        holder.lm = AutoModelForCausalLM.from_config(src.lm.config, dtype=dtype)
        holder.heads = ILQLHeads(src.heads.hidden_size, src.heads.vocab_size).to(dtype) if src.heads is not None \
            else None
        replica["module"] = holder.to(device).eval()
    dst = dict(replica["module"].named_parameters())
    missing = [n for n, _ in src.named_parameters() if n not in dst]
    if missing:
        raise RuntimeError(f"validation replica lacks parameters {missing[:5]}")
    for name, p in src.named_parameters():  # collective: every rank gathers the same parameters in the same order
        with deepspeed.zero.GatheredParameters([p]):
            dst[name].data.copy_(p.data)
    return replica["module"]


def _gather_lists(local: list, world: int) -> list[list]:
    """Every rank's list, in rank order (one all_gather_object); [local] alone on one rank."""
    if world <= 1:
        return [local]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, local)
    return out


def _validate(engine, tok, fmt, val_encoded, val_probs, cfg, target, stage, device, rank: int = 0, world: int = 1,
              replica: dict | None = None) -> dict:
    """Validation loss (BC loss on the teacher sets, token-weighted over the whole validation set) and decoding
    metrics (BLEU vs the teacher's sub-questions, number of sub-questions) over `val_probs`. The set is split across
    the ranks (rank_share): each rank runs its share, decoding stops when its own problems are done (no fixed
    number of steps), and the results are combined (one all-reduce, one all-gather) so every rank has the same."""
    import sacrebleu
    import torch

    from training.data import collate
    from training.decomposer import Decomposer, generate_subquestions

    if not val_encoded and not val_probs:
        return {}
    engine.eval()
    model = _eval_module(engine, stage, replica if replica is not None else {}, device)
    model.eval()
    out: dict[str, Any] = {}
    with torch.no_grad():
        if val_encoded:
            tot = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of target-token losses, target tokens)
            mine = rank_share(val_encoded, rank, world)
            for i in range(0, len(mine), cfg.batch_size):
                b = {k: v.to(device) for k, v in collate(mine[i:i + cfg.batch_size], tok.pad_token_id).items()}
                logits = model.lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                m = b["target_mask"][:, 1:].float()
                ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                       b["input_ids"][:, 1:].reshape(-1), reduction="none")
                tot += torch.stack([(ce.view_as(m) * m).sum(), m.sum()]).double()
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(tot)
            loss_sum, n_tok = tot.tolist()
            out["val_loss"] = loss_sum / max(n_tok, 1.0)
        if val_probs:
            d = Decomposer(model.lm, tok, fmt, str(device), model.heads, target,
                           config={"ilql": cfg.ilql_dict(), "prompt_format": cfg.prompt_format})
            mine = rank_share(val_probs, rank, world)
            local = []
            for i in range(0, len(mine), 8):
                gens = generate_subquestions(d, [p.problem for p in mine[i:i + 8]],
                                             max_new_tokens=cfg.eval_max_new_tokens)
                local += [(" ".join(g.questions), len(g.questions), bool(g.eos)) for g in gens]
            shares = _gather_lists(local, world)
            res: list = [None] * len(val_probs)
            for r, share in enumerate(shares):
                for k, x in enumerate(share):
                    res[r + k * world] = x  # rank_share's order back to the validation set's
            hyps = [x[0] for x in res]
            n_refs = max(len(p.references) for p in val_probs)
            refs = [[" ".join(p.references[k] if k < len(p.references) else p.references[0]) for p in val_probs]
                    for k in range(n_refs)]
            out["val_bleu"] = sacrebleu.corpus_bleu(hyps, refs).score
            out["val_num_subq"] = sum(x[1] for x in res) / len(res)
            out["val_ref_num_subq"] = sum(len(p.references[0]) for p in val_probs) / len(val_probs)
            out["val_parsed_frac"] = sum(1 for x in res if x[1]) / len(res)
            out["val_no_eos_frac"] = sum(1 for x in res if not x[2]) / len(res)  # cut by eval_max_new_tokens
            out["val_problems"] = len(res)
    engine.train()
    return out


def _rank_memory(cfg: TrainConfig, ctx, device) -> int:
    """Bytes of memory this rank may fill: its GPU's, or on CPU the node's RAM over the workers on the node."""
    if cfg.use_gpu:
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total // max(1, ctx.get_local_world_size()))


def _min_over_ranks(value: int, device, world: int) -> int:
    """The smallest `value` over the ranks (one all-reduce; every rank decides the ZeRO stage alike)."""
    if world <= 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _param_counts(cfg: TrainConfig) -> tuple[int, int]:
    """(trainable, frozen) parameters of the engine's module, counted on the meta device from the model's config
    (no weights read): the LM, plus for ILQL the V and twin Q heads; a frozen policy's LM is frozen."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from training.ilql import ILQLHeads

    conf = AutoConfig.from_pretrained(cfg.init_from or cfg.model)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(conf)
        n_lm = sum(p.numel() for p in lm.parameters())
        if cfg.algo != "ilql":
            return n_lm, 0
        heads = ILQLHeads(conf.hidden_size, lm.get_output_embeddings().weight.shape[0])
        n_heads = sum(p.numel() for p in heads.parameters())
    return (n_heads, n_lm) if _frozen_policy(cfg) else (n_lm + n_heads, 0)


def _network_hint() -> str:
    return (f"NCCL_SOCKET_IFNAME={os.environ.get('NCCL_SOCKET_IFNAME', '')!r}: the nodes must reach each other on "
            "that interface (NCCL_DEBUG=INFO in the driver's environment shows the one NCCL picked)")
