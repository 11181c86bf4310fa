"""Distributed == single: the same data and global batch trained by 1 Ray Train worker and by 2 workers with
DeepSpeed ZeRO-0, ZeRO-2 and ZeRO-3 (fp32, CPU, gloo) give the same per-step losses and the same saved weights.

Global batch 4: 1 worker x micro-batch 4, or 2 workers x micro-batch 2 (rank r takes every other half of the
same seeded shuffle, training.data.batches). 8 examples, 3 steps: two batches of epoch 0, one of epoch 1.
Every example has the same number of target tokens: DeepSpeed averages the ranks' gradients (the mean of
per-rank token means), which equals the 1-worker token mean only then. Dropout is off in the model (the ranks'
dropout masks cannot match one worker's).

Tolerances (fp32; only the reduction order differs): loss rel 1e-4 per step; weights max |diff| 2e-5, while
3 steps at lr 1e-3 move them by ~3e-3 (checked: the tolerance is far below the training's own change)."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest

from tests.conftest import DATASET_TEST
from conftest import local_ray

STEPS, LR = 3, 1e-3
LOSS_REL, W_ATOL = 1e-4, 2e-5



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model dir, data file): a tiny GPT-2 without dropout; 8 released sets with equal target token counts."""
    import ray
    from transformers import AutoTokenizer

    from subq.schema import SubQRow, read_rows, write_parquet
    from subq.textformat import get_format
    from training.data import Example, encode
    from training.init_model import create_tiny_model

    base = tmp_path_factory.mktemp("dist")
    model = create_tiny_model(str(base / "tiny"), n_layer=2, n_embd=64)
    cfg_path = os.path.join(model, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    json.dump(cfg, open(cfg_path, "w"))
    tok = AutoTokenizer.from_pretrained(model)
    fmt = get_format("paper")
    by_len = defaultdict(list)
    for row in read_rows(str(DATASET_TEST)):
        s = row.sets[0]
        if s.questions:
            enc = encode(Example(row.problem_id, row.problem, s.questions), tok, fmt, 512)
            if enc:
                by_len[sum(enc["target_mask"])].append(SubQRow(row.problem_id, row.problem, row.gold_answer,
                                                               row.true_answer, [s]))
    group = max(by_len.values(), key=len)
    assert len(group) >= 8, {k: len(v) for k, v in by_len.items()}
    write_parquet(group[:8], str(base / "rows.parquet"))
    local_ray()
    try:
        yield model, str(base / "rows.parquet"), base
    finally:
        ray.shutdown()


def _train(setup, name: str, workers: int, stage: int) -> tuple[list[float], dict]:
    from safetensors.torch import load_file

    from training.train import run_train

    model, data, base = setup
    r = run_train(dict(algo="bc", data=data, model=model, steps=STEPS, batch_size=4 // workers, lr=LR,
                       num_workers=workers, deepspeed=f"zero{stage}", storage_path=str(base / "runs"), name=name,
                       checkpoint_every=1000, log_every=1, val_fraction=0, eval_problems=0))
    history = json.loads(open(os.path.join(r["run_dir"], "metrics.json")).read())
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    assert all(h["world_size"] == workers and h["zero_stage"] == stage for h in history)
    return [h["loss"] for h in history], load_file(os.path.join(r["final_dir"], "model.safetensors"))


@pytest.fixture(scope="module")
def single(setup):
    return _train(setup, "one", 1, 0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_workers_match_one_worker(setup, single, stage):
    from safetensors.torch import load_file

    losses1, w1 = single
    losses2, w2 = _train(setup, f"two-z{stage}", 2, stage)
    assert losses2 == pytest.approx(losses1, rel=LOSS_REL), (losses1, losses2)
    assert len(set(round(x, 3) for x in losses1)) == STEPS  # the loss moves: equal losses are not a constant
    assert w1.keys() == w2.keys()
    diff = {k: (w1[k] - w2[k]).abs().max().item() for k in w1}
    worst = max(diff, key=diff.get)
    assert diff[worst] <= W_ATOL, (worst, diff[worst])
    init = load_file(os.path.join(setup[0], "model.safetensors"))
    moved = max((w1[k] - init[k]).abs().max().item() for k in w1 if k in init)
    assert moved > 50 * W_ATOL, moved  # the tolerance is far below what 3 steps change
