"""The GPU code paths of `subq train`, proved on CPU with real components (issue 16): DeepSpeed's CPU accelerator
runs bf16, so the GPU defaults (bf16 + ZeRO-3, bf16 + ZeRO-2) run in a real 2-worker TorchTrainer here.

- frozen-policy ILQL + ZeRO-3 + bf16 trains (the LM is built in bf16 under zero.Init; the ILQL heads must match its
  dtype) and saves the frozen policy as the fp32 original, bit for bit (its engine copy is bf16-rounded);
- final/ holds the fp32 master weights (compared with DeepSpeed's own zero_to_fp32 of the last checkpoint),
  not the bf16 copy, for ZeRO-2 (the LM) and ZeRO-3 (the ILQL heads);
- validation is split across the ranks and each rank's decoding stops with its own problems (no fixed steps),
  under ZeRO-3 too (counted in the workers by wrapping generate_subquestions); best/ is written off the loop;
- host syncs: the training loop's own code reads a device value at most once per logging step (counted in the
  workers by patching Tensor.item/tolist/__float__/__int__/__bool__ from a Ray worker setup hook).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.training.test_train import _rows

TRAINING_DIR = str(Path(__file__).resolve().parents[2] / "training")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from training.init_model import create_tiny_model

    return create_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny"), n_layer=2, n_embd=64)


def _count_host_syncs(log_dir: str):
    """Ray worker setup hook (a closure: shipped by value): counts calls that copy a tensor's value to the host
    made by code under training/, and writes the count at each `ray.train.report` (one line per report)."""

    def install() -> None:
        import os
        import sys as _sys

        import ray.train
        import torch

        import training.decomposer as dec
        import training.train.loop as tr

        count, paused = [0], [False]

        def wrap(name):
            orig = getattr(torch.Tensor, name)

            def f(self, *a, **k):
                if not paused[0] and TRAINING_DIR in _sys._getframe(1).f_code.co_filename:
                    count[0] += 1
                return orig(self, *a, **k)

            setattr(torch.Tensor, name, f)

        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
            wrap(name)
        generate = dec.generate_subquestions

        def uncounted(fn):  # validation's reads are its own (decoding checks EOS every 8 tokens), and so are the
            def f(*a, **k):  # best/ decision at a validation step and the start-up's one all-reduce
                paused[0] = True
                try:
                    return fn(*a, **k)
                finally:
                    paused[0] = False

            return f

        def logged_generate(d, problems, **k):
            with open(os.path.join(log_dir, f"decode-{os.getpid()}.jsonl"), "a") as fh:
                fh.write(json.dumps({"problems": len(problems), "fixed_steps": bool(k.get("fixed_steps"))}) + "\n")
            return generate(d, problems, **k)

        for name in ("_validate", "_improves_best", "_min_over_ranks"):
            if hasattr(tr, name):
                setattr(tr, name, uncounted(getattr(tr, name)))
        dec.generate_subquestions = logged_generate
        report = ray.train.report

        def counted_report(metrics, *a, **k):
            with open(os.path.join(log_dir, f"syncs-{os.getpid()}.jsonl"), "a") as fh:
                fh.write(json.dumps({"step": metrics.get("step"), "syncs": count[0],
                                    "nccl_ifname": os.environ.get("NCCL_SOCKET_IFNAME")}) + "\n")
            count[0] = 0
            return report(metrics, *a, **k)

        ray.train.report = counted_report

    return install


@pytest.fixture(scope="module")
def ray_syncs(tmp_path_factory):
    import ray

    from tests.training.test_preflight import connect, start_head, stop_cluster, wait_nodes

    log_dir = str(tmp_path_factory.mktemp("syncs"))
    # `ray start` of its own rather than ray.init(num_cpus=...): on a loaded machine the raylet may register after
    # ray.init's fixed 30 s wait, which ray.init treats as fatal
    temp_dir = tempfile.mkdtemp(prefix="rgp", dir="/tmp")
    try:
        # auth as this process's ray.init() has it (token auth is cached per process; multi-node token auth is
        # test_preflight's, in its own interpreter)
        mode = os.environ.get("RAY_AUTH_MODE", "disabled")
        address = start_head(temp_dir, num_cpus=2, store_mb=150, env={"RAY_AUTH_MODE": mode})
        connect(address, runtime_env={"worker_process_setup_hook": _count_host_syncs(log_dir)})
        wait_nodes(1)
        yield Path(log_dir)
    finally:
        ray.shutdown()
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _bf16_config(tmp_path: Path, stage: int) -> str:
    """A DeepSpeed config asking for bf16 explicitly (the presets' "auto" means fp32 on CPU)."""
    from training.config import PRESETS

    ds = json.loads(PRESETS[f"zero{stage}"].read_text())
    ds["bf16"] = {"enabled": True}
    p = tmp_path / f"zero{stage}-bf16.json"
    p.write_text(json.dumps(ds))
    return str(p)


def _fp32_master(run_dir: Path) -> dict:
    """DeepSpeed's zero_to_fp32 consolidation of the run's last Ray Train checkpoint (tag "ds")."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    last = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]  # not checkpoint_manager_snapshot.json
    return get_fp32_state_dict_from_zero_checkpoint(str(last), tag="ds")


def _assert_final_is_fp32_master(final: Path, master: dict) -> None:
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(final / "model.safetensors"))
    lm = {k[3:]: v for k, v in master.items() if k.startswith("lm.")}
    common = set(saved) & set(lm)
    assert len(common) >= len(saved) - 1, (sorted(saved), sorted(lm))  # (a tied lm_head may be stored once)
    for k in sorted(common):
        assert saved[k].dtype == torch.float32
        assert torch.equal(saved[k], lm[k].float()), k  # the fp32 master, bit for bit: not the bf16 copy
    # and the master really differs from its bf16 rounding (so the comparison above can fail)
    assert any(not torch.equal(lm[k].float(), lm[k].bfloat16().float()) for k in common)


@pytest.mark.slow
def test_frozen_ilql_zero3_bf16_two_workers_keeps_the_fp32_policy_and_splits_validation(tmp_path, tiny, ray_syncs):
    import torch
    from safetensors.torch import load_file

    from subq.schema import write_parquet
    from training.train import run_train

    # 48 problems, 17 held out: rank 0 decodes 9 (two decode batches of up to 8), rank 1 decodes 8 (one batch), so
    # the ranks run different numbers of forwards (the engine's ZeRO-3 module would need them in lockstep)
    write_parquet(_rows(48, correct_every=2), str(tmp_path / "rows.parquet"))
    r = run_train(dict(algo="ilql", data=str(tmp_path / "rows.parquet"), model=tiny, steps=4, batch_size=4,
                       grad_accum=2, num_workers=2, deepspeed=_bf16_config(tmp_path, 3),
                       storage_path=str(tmp_path / "runs"), name="ilql3", checkpoint_every=4, log_every=2,
                       val_fraction=17 / 48, eval_max_new_tokens=12, ilql={"policy": "frozen"}))
    m = r["metrics"]
    assert m["step"] == 4 and m["zero_stage"] == 3 and m["world_size"] == 2 and m["bf16"] is True
    assert m["precision"] == "bf16"
    assert all(v == v and abs(v) < 1e4 for k, v in m.items() if k.endswith("loss"))  # finite losses
    run = tmp_path / "runs" / "ilql3"
    # the frozen policy is saved as the fp32 original, bit for bit, not its bf16 compute copy
    original, saved = load_file(str(Path(tiny) / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert saved.keys() == original.keys()
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], v) for k, v in original.items())
    assert any(not torch.equal(v, v.bfloat16().float()) for v in original.values())  # bf16 rounding would show
    # the ILQL heads are the optimizer's fp32 master (DeepSpeed's own zero_to_fp32 of the last checkpoint)
    master = _fp32_master(run)
    heads = load_file(str(run / "final" / "ilql_heads.safetensors"))
    assert any(k.startswith("heads.") for k in master)
    for k, v in master.items():
        if k.startswith("heads."):
            assert torch.equal(heads[k], v.float()), k
    info = json.loads((run / "final" / "checkpoint.json").read_text())
    assert info["precision"] == "bf16" and info["zero_stage"] == 3 and "bf16 on CPU" in info["precision_reason"]
    # validation: the 17 problems split across the 2 ranks, each decoded once, none with fixed steps
    decodes = {f.name: [json.loads(x) for x in f.read_text().splitlines()] for f in ray_syncs.glob("decode-*.jsonl")}
    per_rank = sorted(sum(x["problems"] for x in calls) for calls in decodes.values())
    assert per_rank == [8, 9], decodes
    assert not any(x["fixed_steps"] for calls in decodes.values() for x in calls), decodes
    assert m["val_problems"] == 17 and "val_bleu" in m and "val_loss" in m
    # best/ (step 4) was written by rank 0's helper thread, complete
    assert json.loads((run / "best" / "checkpoint.json").read_text())["step"] == 4
    assert load_file(str(run / "best" / "ilql_heads.safetensors")).keys() == heads.keys()
    # host syncs of the loop's own code outside validation: at most one per logging step (2 reports, 8 micro-steps)
    lines = [json.loads(x) for f in ray_syncs.glob("syncs-*.jsonl") for x in f.read_text().splitlines()]
    assert len(lines) == 2 * 2, lines  # 2 ranks x 2 reports
    assert all(x["syncs"] <= 1 for x in lines), lines
    for f in [*ray_syncs.glob("syncs-*.jsonl"), *ray_syncs.glob("decode-*.jsonl")]:
        f.unlink()


@pytest.mark.slow
def test_bc_zero2_bf16_two_workers_saves_fp32_master(tmp_path, tiny, ray_syncs, monkeypatch):
    """Also: the driver's NCCL_SOCKET_IFNAME reaches every worker (the workers' processes started before it was
    set, so only the run's worker runtime_env can carry it); the model given as a URI is copied to the node."""
    from subq.schema import write_parquet
    from training.train import run_train

    write_parquet(_rows(16), str(tmp_path / "rows.parquet"))
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
    r = run_train(dict(algo="bc", data=str(tmp_path / "rows.parquet"), model=f"file://{tiny}", steps=3, batch_size=4, lr=3e-3, num_workers=2, deepspeed=_bf16_config(tmp_path, 2),
                       storage_path=str(tmp_path / "runs"), name="bc2", checkpoint_every=3, log_every=3,
                       val_fraction=0, eval_problems=0))
    assert r["metrics"]["zero_stage"] == 2 and r["metrics"]["bf16"] is True
    run = tmp_path / "runs" / "bc2"
    _assert_final_is_fp32_master(run / "final", _fp32_master(run))
    # the pre-flight's resume check reads the world size from DeepSpeed's real shard names
    from training.preflight import checkpoint_world_size, latest_checkpoint

    assert checkpoint_world_size(latest_checkpoint(str(run))) == 2
    lines = [json.loads(x) for f in ray_syncs.glob("syncs-*.jsonl") for x in f.read_text().splitlines()]
    assert lines and all(x["nccl_ifname"] == "lo" for x in lines), lines
    for f in [*ray_syncs.glob("syncs-*.jsonl"), *ray_syncs.glob("decode-*.jsonl")]:
        f.unlink()


def test_target_q_of_the_actions_equals_the_full_vocabulary_gather_and_sync_rate_rescaled():
    import torch

    from training.ilql import ILQLConfig, ILQLHeads, TargetQHeads, ilql_losses, polyak_rate, polyak_update

    torch.manual_seed(0)
    heads = ILQLHeads(8, 11)
    target = TargetQHeads(heads)
    h, ids = torch.randn(2, 6, 8), torch.randint(0, 11, (2, 6))
    q1, q2 = target(h)
    a = ids[:, 1:, None]
    full = torch.minimum(q1[:, :-1].gather(-1, a), q2[:, :-1].gather(-1, a)).squeeze(-1)
    direct = target.action_values(h[:, :-1], ids[:, 1:])
    assert torch.allclose(direct, full, atol=1e-6)
    # the losses are the same either way; stats stay on the device until asked for
    args = (torch.randn(2, 6, 11), *heads(h)[:2])
    v, tmask, rew = torch.randn(2, 6), torch.tensor([[0, 0, 1, 1, 1, 1]] * 2), torch.zeros(2, 6)
    l_full, s_full = ilql_losses(*args, q1, q2, v, ids, tmask, rew, ILQLConfig())
    l_dir, s_dir = ilql_losses(*args, direct, None, v, ids, tmask, rew, ILQLConfig(), host_stats=False)
    assert torch.allclose(l_full, l_dir, atol=1e-5) and all(isinstance(x, torch.Tensor) for x in s_dir.values())
    # a sync every k steps at the rescaled rate moves a target as far as k per-step syncs (fixed online heads)
    k, alpha = 4, 0.05
    t_every, t_step = TargetQHeads(heads), TargetQHeads(heads)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(1.0)
    for _ in range(k):
        polyak_update(t_step, heads, alpha)
    polyak_update(t_every, heads, polyak_rate(alpha, k))
    for x, y in zip(t_every.parameters(), t_step.parameters()):
        assert torch.allclose(x, y, atol=1e-6)
    assert polyak_rate(alpha, 1) == pytest.approx(alpha)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))


def test_batched_decoding_reads_the_device_only_every_few_steps(tiny):
    """Decoding (validation, serving, evaluation) keeps tokens, EOS bookkeeping and sampling on the device: the
    host reads a value once every SYNC_EVERY steps and once at the end, never once per row per token."""
    import torch

    from training import decomposer as dec

    d = dec.load_decomposer(tiny)
    problems = [f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?" for i in range(6)]
    greedy = dec.generate_subquestions(d, problems, max_new_tokens=32, fixed_steps=True)
    count = [0]
    originals = {}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu"):
        orig = originals[name] = getattr(torch.Tensor, name)

        def f(self, *a, _orig=orig, **k):
            if dec.__file__ == sys._getframe(1).f_code.co_filename:
                count[0] += 1
            return _orig(self, *a, **k)

        setattr(torch.Tensor, name, f)
    try:
        for sample in (False, True):
            count[0] = 0
            gens = dec.generate_subquestions(d, problems, max_new_tokens=32, do_sample=sample, seed=0)
            assert count[0] <= 32 // dec.SYNC_EVERY + 3, (sample, count[0])  # was 7 per step (one per row + all())
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)
    again = dec.generate_subquestions(d, problems, max_new_tokens=32)
    assert [g.text for g in again] == [g.text for g in greedy]  # stopping early changes no row
    assert all(g.completion_tokens <= 32 for g in gens + again)
    s1 = dec.generate_subquestions(d, problems, max_new_tokens=16, do_sample=True, seed=3)
    s2 = dec.generate_subquestions(d, problems, max_new_tokens=16, do_sample=True, seed=3)
    assert [g.text for g in s1] == [g.text for g in s2]  # seeded sampling is reproducible
