"""Training throughput on the tiny model: subq's Ray Train + DeepSpeed job (2 CPU workers) vs a bare
single-process PyTorch loop doing the same optimizer steps with the same global batch, for BC and ILQL.

    python benchmarks/bench_train.py --steps 40 --batch-size 8 --workers 2 --deepspeed zero2

tokens/s counts non-padding tokens of the training batches. "steady" excludes the first log window (start-up,
first-step overheads); "wall" is the whole call (Ray Train: worker start, DeepSpeed init, checkpoints, final save).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "subq" / "data" / "gsm8k-ai-subq" / "qg_test_dataset.jsonl"


def bare_loop(cfg, steps: int, global_batch: int) -> dict:
    """The same model/loss in one process: torch AdamW, no Ray, no DeepSpeed."""
    import torch
    from transformers import AutoTokenizer

    from subq.textformat import get_format
    from training.bc import bc_loss
    from training.data import batches, collate, encode, read_training_rows, select_examples
    from training.ilql import ILQLConfig, TargetQHeads, ilql_losses, polyak_update
    from training.train.loop import _build_module

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    ex, _ = select_examples(read_training_rows(cfg.data), cfg.algo, cfg.rewards)
    enc = [e for e in (encode(x, tok, get_format(cfg.text_format), cfg.max_length,
                              cfg.rewards if cfg.algo == "ilql" else None) for x in ex) if e]
    module = _build_module(cfg, tok)
    target = TargetQHeads(module.heads) if module.heads is not None else None
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=cfg.lr)
    icfg = ILQLConfig()
    data = batches(enc, global_batch, 0, 1, cfg.seed)
    tokens, t_first, t0 = 0, None, time.perf_counter()
    for step in range(steps):
        b = collate(next(data), tok.pad_token_id)
        logits, h, q1, q2, v = module(b["input_ids"], b["attention_mask"])
        if target is not None:
            tq1, tq2 = target(h.detach())
            loss, _ = ilql_losses(logits, q1, q2, tq1, tq2, v, b["input_ids"], b["target_mask"], b["rewards"], icfg)
        else:
            loss = bc_loss(logits, b["input_ids"], b["target_mask"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        if target is not None:
            polyak_update(target, module.heads, icfg.polyak)
        if step == 0:
            t_first = time.perf_counter()
        else:
            tokens += int(b["attention_mask"].sum())
    wall = time.perf_counter() - t0
    return {"tokens_per_s": tokens / (time.perf_counter() - t_first), "wall_s": wall}


def ray_job(cfg, storage: str) -> dict:
    from training.train import run_train

    t0 = time.perf_counter()
    r = run_train(cfg)
    wall = time.perf_counter() - t0
    hist = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
    steady = hist[1:] or hist
    tps = sum(h["tokens_per_s_rank"] for h in steady) / len(steady) * hist[-1]["world_size"]
    return {"tokens_per_s": tps, "wall_s": wall}


def main() -> None:
    import ray

    from training.config import TrainConfig
    from training.init_model import create_tiny_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8, help="micro batch per Ray worker; the bare loop uses workers x this")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--deepspeed", default="zero2")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    model = create_tiny_model(f"{tmp}/tiny", n_layer=2, n_embd=64)
    ray.init(num_cpus=a.workers, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False)
    rows = []
    try:
        for algo in ("bc", "ilql"):
            cfg = TrainConfig(algo=algo, data=str(DATA), model=model, steps=a.steps, batch_size=a.batch_size,
                              num_workers=a.workers, deepspeed=a.deepspeed, storage_path=f"{tmp}/runs", name=algo,
                              val_fraction=0, eval_problems=0, log_every=10, checkpoint_every=10**6, lr=1e-4)
            bare = bare_loop(cfg, a.steps, a.batch_size * a.workers)
            rj = ray_job(cfg, f"{tmp}/runs")
            rows.append((algo, bare, rj))
    finally:
        ray.shutdown()
    print(f"\ntiny GPT-2 (2 layers, width 64), {a.steps} steps, global batch {a.batch_size * a.workers}, "
          f"Ray Train {a.workers} CPU workers + DeepSpeed {a.deepspeed} vs bare 1-process loop\n")
    print("| algo | bare tokens/s | Ray Train tokens/s | ratio (Ray/bare) | bare wall s | Ray Train wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for algo, bare, rj in rows:
        print(f"| {algo} | {bare['tokens_per_s']:.0f} | {rj['tokens_per_s']:.0f} | "
              f"{rj['tokens_per_s'] / bare['tokens_per_s']:.2f} | {bare['wall_s']:.1f} | {rj['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
