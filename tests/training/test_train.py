"""`subq train`: data encoding (masks, rewards), config/data errors before any work, and real Ray Train +
DeepSpeed runs on CPU on the tiny model: BC overfits 32 examples with 2 workers (ZeRO-2), Filtered BC trains only
on correct sets (CLI), ILQL (dense, ZeRO-3, 2 workers) survives a worker killed mid-training by resuming from
its checkpoint. The ILQL losses and the synthetic guided-decoding test are in test_ilql.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import DATASET_TEST


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from training.init_model import create_tiny_model

    return create_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny"), n_layer=2, n_embd=64)


def _rows(n=32, correct_every=None, usefulness=False):
    """The first n released training entries; optionally every k-th set marked wrong, usefulness filled in."""
    from subq.schema import read_rows

    rows = read_rows(str(DATASET_TEST))[:n]
    for i, r in enumerate(rows):
        for s in r.sets:
            if correct_every:
                s.answer_correctness = 0.0 if i % correct_every == 0 else 1.0
            if usefulness:
                s.usefulness = [1.0 if j % 2 == 0 else 1 / 3 for j in range(len(s.questions))]
    return rows


# ---------------------------------------------------------------- data (no Ray)


@pytest.mark.parametrize("fmt_name", ["paper", "qlines"])
def test_encode_loss_mask_and_reward_placement(tiny, fmt_name):
    from transformers import AutoTokenizer

    from subq.textformat import get_format
    from training.data import Example, encode

    tok = AutoTokenizer.from_pretrained(tiny)
    fmt = get_format(fmt_name)
    ex = Example("p1", "Tom has 3 apples and buys 4 more.", ["How many did he buy?", "How many in all?"], 1.0, [0.5, 1.0])
    dense = encode(ex, tok, fmt, 256, "dense")
    ids, mask, rew = dense["input_ids"], dense["target_mask"], dense["rewards"]
    n_prompt = mask.index(1)
    assert tok.decode(ids[:n_prompt]) == fmt.prompt(ex.problem)  # the problem is never in the loss
    assert all(mask[n_prompt:]) and ids[-1] == tok.eos_token_id  # sub-question tokens + EOS are
    assert tok.decode(ids[n_prompt:-1]) == fmt.target(ex.questions)
    assert sorted(r for r in rew if r) == [0.5, 1.0, 1.0]  # usefulness per sub-question + correctness


def test_encode_rewards_positions(tiny):
    from transformers import AutoTokenizer

    from subq.textformat import get_format
    from training.data import Example, encode

    tok = AutoTokenizer.from_pretrained(tiny)
    fmt = get_format("paper")
    ex = Example("p1", "Tom has 3 apples and buys 4 more.", ["How many did he buy?", "How many in all?"], 1.0, [0.5, 0.25])
    dense = encode(ex, tok, fmt, 256, "dense")
    ids, mask, rew = dense["input_ids"], dense["target_mask"], dense["rewards"]
    n_prompt = mask.index(1)
    nonzero = [i for i, r in enumerate(rew) if r]
    assert len(nonzero) == 3 and rew[-1] == 1.0  # correctness on the final (EOS) token
    first, second = nonzero[0], nonzero[1]
    assert rew[first] == 0.5 and rew[second] == 0.25
    assert tok.decode(ids[n_prompt:first + 1]) == fmt.target(ex.questions[:1])  # last token of sub-question 1
    assert tok.decode(ids[n_prompt:second + 1]) == fmt.target(ex.questions)  # last token of sub-question 2
    sparse = encode(ex, tok, fmt, 256, "sparse")
    assert [i for i, r in enumerate(sparse["rewards"]) if r] == [len(ids) - 1]
    assert not any(encode(ex, tok, fmt, 256, None)["rewards"])  # BC: no rewards
    assert encode(ex, tok, fmt, 8, None) is None  # a target longer than max_length is dropped, not cut


def test_filtered_bc_selects_only_correct_sets():
    from training.data import select_examples

    rows = _rows(32, correct_every=4)
    n_sets = sum(len(r.sets) for r in rows)
    n_wrong = sum(1 for r in rows for s in r.sets if s.answer_correctness == 0.0)
    ex, stats = select_examples(rows, "filtered_bc", "sparse")
    assert n_wrong == 8 and stats["used"] == n_sets - 8 == len(ex) and stats["filtered_out"] == 8
    assert all(e.correctness == 1.0 for e in ex)
    ex_bc, stats_bc = select_examples(rows, "bc", "sparse")
    assert stats_bc["used"] == n_sets


def test_deepspeed_config_cpu_and_gpu():
    from training.config import TrainConfig, deepspeed_config

    cpu = deepspeed_config(TrainConfig(data="x", model="m", deepspeed="zero3", batch_size=4, grad_accum=2), 2)
    assert cpu["zero_optimization"]["stage"] == 3 and cpu["bf16"]["enabled"] is False
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["train_batch_size"] == 16
    gpu_cfg = TrainConfig(data="x", model="m", deepspeed="zero2", use_gpu=True)
    gpu = deepspeed_config(gpu_cfg, 8, bf16_supported=True)
    assert gpu["bf16"]["enabled"] is True
    assert gpu["optimizer"]["params"]["torch_adam"] is True  # no FusedAdam: it needs nvcc on the nodes
    # bf16 "auto" follows the worker's GPU (native bf16: training.config.native_bf16), not use_gpu
    assert deepspeed_config(gpu_cfg, 8, bf16_supported=False)["bf16"]["enabled"] is False


def _fake_gpu(monkeypatch, capability, name, total_gib=24):
    """torch.cuda as a GPU of this compute capability would answer it (torch's is_bf16_supported() says True for
    GPUs that only emulate bf16, e.g. T4 and V100: including_emulation defaults to True)."""
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(
        name=name, major=capability[0], minor=capability[1], total_memory=int(total_gib * 2**30)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", None)


def test_bf16_auto_only_on_native_bf16_gpus_and_the_run_says_which(monkeypatch, tmp_path):
    """bf16 "auto" is on only where the GPU computes bf16 natively (compute capability >= 8.0), not where torch
    emulates it (T4 7.5, V100 7.0): those train in fp32 (or fp16 when the DeepSpeed config asks for it)."""
    from subq.errors import ConfigError
    from training.config import TrainConfig, deepspeed_config, gpu_precision, native_bf16

    cfg = TrainConfig(data="x", model="m", deepspeed="zero2", use_gpu=True)
    for cap, name, want in [((7, 5), "Tesla T4", "fp32"), ((7, 0), "Tesla V100-SXM2-16GB", "fp32"),
                            ((8, 6), "NVIDIA A10G", "bf16"), ((9, 0), "NVIDIA H100 80GB HBM3", "bf16")]:
        _fake_gpu(monkeypatch, cap, name)
        assert native_bf16() is (want == "bf16"), name
        ds = deepspeed_config(cfg, 2)  # decided here, as on a worker
        assert ds["bf16"]["enabled"] is (want == "bf16") and not (ds.get("fp16") or {}).get("enabled"), name
        precision, why = gpu_precision(ds)
        assert precision == want and name in why and f"{cap[0]}.{cap[1]}" in why, (precision, why)
    # fp16 asked for in the DeepSpeed config: honoured on a GPU without native bf16, and "auto" bf16 stays off
    ds_fp16 = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}, "fp16": {"enabled": True}}
    (tmp_path / "fp16.json").write_text(json.dumps(ds_fp16))
    _fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    ds = deepspeed_config(TrainConfig(data="x", model="m", deepspeed=str(tmp_path / "fp16.json"), use_gpu=True), 2)
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False and gpu_precision(ds)[0] == "fp16"
    # bf16 forced on a GPU that only emulates it: refused, naming the field
    ds_bf16 = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    (tmp_path / "bf16.json").write_text(json.dumps(ds_bf16))
    with pytest.raises(ConfigError, match="deepspeed.bf16.enabled"):
        deepspeed_config(TrainConfig(data="x", model="m", deepspeed=str(tmp_path / "bf16.json"), use_gpu=True), 2)


def test_zero_stage_auto_from_model_size_and_world_size():
    """deepspeed "auto" (the default): the lowest ZeRO stage whose per-GPU model states fit half the GPU's memory;
    a model that fits one GPU never gets ZeRO-2/3 (they reduce gradients at every micro-step; ZeRO-3 also gathers
    the weights in every forward and backward), whatever the world size."""
    from training.config import TrainConfig, choose_zero_stage, deepspeed_config, model_state_bytes

    assert TrainConfig(data="x", model="m").deepspeed == "auto"
    gib = 2**30
    gpt2, gpt2_xl, heads = 124_000_000, 1_558_000_000, 2 * 78_500_000 + 1_200_000  # GPT-2 ILQL heads: ~158M
    # bytes per trainable parameter: bf16 weights 2 + grads 2 + fp32 master 4 + Adam 8 = 16 (ZeRO paper, K=12)
    assert model_state_bytes(gpt2, 0, stage=0, world=1, precision="bf16") == 16 * gpt2
    assert model_state_bytes(gpt2, 0, stage=2, world=4, precision="bf16") == 2 * gpt2 + 14 * gpt2 // 4
    assert model_state_bytes(gpt2, 0, stage=3, world=4, precision="bf16") == 16 * gpt2 // 4
    # frozen parameters: their compute copy only (frozen ILQL: the LM is frozen, the heads train)
    assert model_state_bytes(heads, gpt2, stage=0, world=1, precision="bf16") == 16 * heads + 2 * gpt2
    a10g = 24 * gib
    for world in (1, 2, 8):  # fits one A10G: ZeRO-0 on any number of nodes
        assert choose_zero_stage(gpt2, 0, world, a10g, "bf16")[0] == 0
        assert choose_zero_stage(gpt2 + heads, 0, world, a10g, "bf16")[0] == 0  # shared ILQL
    # GPT-2 XL: 24.9 GB of states, 12.9 GB budget (half of 24 GiB). 1 rank: nothing fits (said so); 2 ranks:
    # ZeRO-3 (12.5 GB; ZeRO-2 3.1 + 21.8/2 = 14.0 GB does not fit); 3 ranks: ZeRO-1 (6.2 + 18.7/3 = 12.5 GB)
    stage, why = choose_zero_stage(gpt2_xl, 0, 1, a10g, "bf16")
    assert stage == 3 and "more than" in why
    assert choose_zero_stage(gpt2_xl, 0, 2, a10g, "bf16")[0] == 3
    assert choose_zero_stage(gpt2_xl, 0, 3, a10g, "bf16")[0] == 1
    assert choose_zero_stage(gpt2_xl, 0, 1, 80 * gib, "bf16")[0] == 0  # one H100 holds it all
    # the resulting DeepSpeed config is the chosen preset's
    assert deepspeed_config(TrainConfig(data="x", model="m"), 2, stage=2)["zero_optimization"]["stage"] == 2


def test_nccl_interface_default_is_the_exclusion_form_and_the_environment_wins():
    from training.train.runtime import NCCL_IFNAME_DEFAULT, network_defaults

    assert NCCL_IFNAME_DEFAULT == "^docker0,lo"
    env: dict = {}
    assert network_defaults(env, use_gpu=True) == {"NCCL_SOCKET_IFNAME": "^docker0,lo"}
    assert env["NCCL_SOCKET_IFNAME"] == "^docker0,lo"
    env = {"NCCL_SOCKET_IFNAME": "eth1"}  # the driver's (passed in the runtime env) or the node's own setting
    assert network_defaults(env, use_gpu=True) == {} and env["NCCL_SOCKET_IFNAME"] == "eth1"
    assert network_defaults({}, use_gpu=False) == {}  # CPU runs use gloo


def test_a_hung_start_up_stage_times_out_even_when_blocked_outside_python():
    """The stage runs in a helper thread and the caller waits with a deadline: a hang inside a C call (NCCL's
    communicator set-up in deepspeed.initialize never returns to the interpreter) still ends in StageTimeout
    naming the stage, which an asynchronous exception (training.ds_ops.stage_timeout) cannot deliver."""
    import threading

    from training.ds_ops import StageTimeout
    from training.train.runtime import run_stage

    never = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(StageTimeout, match="deepspeed.initialize.*hint here"):
        run_stage("deepspeed.initialize", 1.0, never.wait, hint="hint here")  # blocks in C (a lock acquire)
    assert time.monotonic() - t0 < 30
    assert run_stage("x", 5.0, lambda a, b=0: a + b, 1, b=2) == 3  # a result comes back
    with pytest.raises(ZeroDivisionError):  # an error of the stage is the stage's error
        run_stage("x", 5.0, lambda: 1 / 0)
    never.set()


def test_rank_shares_split_the_validation_set():
    from training.train.loop import rank_share

    items = list(range(11))
    shares = [rank_share(items, r, 3) for r in range(3)]
    assert sorted(x for s in shares for x in s) == items and [len(s) for s in shares] == [4, 4, 3]
    assert rank_share(items, 0, 1) == items and rank_share([1], 1, 2) == []


def test_best_checkpoint_writer_does_not_stall_the_caller_and_surfaces_errors():
    """best/ is written by a helper thread from a CPU copy: submit returns at once; a newer best/ supersedes one
    not yet started; close() waits for the last write; a failed write is raised in the loop."""
    import threading

    from training.train.checkpoints import _CheckpointWriter

    gate, done = threading.Event(), []
    w = _CheckpointWriter()
    t0 = time.monotonic()
    w.submit(lambda: (gate.wait(10), done.append(1)))
    w.submit(lambda: done.append(2))  # queued behind the running write
    w.submit(lambda: done.append(3))  # supersedes 2
    assert time.monotonic() - t0 < 1 and done == []
    gate.set()
    w.close()
    assert done == [1, 3]
    w = _CheckpointWriter()
    w.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        w.close()


def test_bad_config_is_refused_before_any_work(tmp_path, tiny, subq_bin):
    from subq.errors import SubqError
    from subq.schema import write_paper
    from training.train import run_train

    import pyarrow as pa
    import pyarrow.parquet as pq

    base = dict(model=tiny, storage_path=str(tmp_path / "runs"), name="x")
    r = subprocess.run([subq_bin, "train", "--algo", "dqn", "--data", str(DATASET_TEST), "--model", tiny],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "field 'algo'" in r.stderr and "Traceback" not in r.stderr
    pq.write_table(pa.table({"problem_id": ["p1"], "problem": ["x"]}), tmp_path / "nosets.parquet")
    unscored = _rows(4)
    for row in unscored:
        for s in row.sets:
            s.answer_correctness = None
    write_paper(unscored, str(tmp_path / "raw.jsonl"), "paper_raw")  # no answers: no rewards
    cases = [
        (dict(algo="bc", data=str(tmp_path / "nosets.parquet")), "field 'sets'"),
        (dict(algo="ilql", data=str(tmp_path / "raw.jsonl")), "field 'answer_correctness'"),
        (dict(algo="ilql", rewards="dense", data=str(DATASET_TEST)), "field 'usefulness'"),
        (dict(algo="bc", data=str(DATASET_TEST), model=str(tmp_path / "nomodel")), "field 'model'"),
        (dict(algo="bc", data=str(DATASET_TEST), deepspeed="zero9"), "deepspeed"),
        (dict(algo="bc", data=str(DATASET_TEST), resume=True), "field 'resume'"),
    ]
    for overrides, needle in cases:
        with pytest.raises((SubqError, ValueError), match=needle):
            run_train({**base, **overrides})
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_missing_model_path_and_empty_parts_dir_fail_at_once_without_network(tmp_path, tiny, monkeypatch):
    """`--model models/nope` (a path that does not exist) is an error before any hub lookup: no socket is opened;
    with HF_HUB_OFFLINE set a bare hub id is refused too; an empty parts directory as --data says so."""
    import socket

    from subq.errors import SubqError
    from training.train import run_train

    attempts = []

    def no_network(self, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    base = dict(data=str(DATASET_TEST), storage_path=str(tmp_path / "runs"), name="x")
    for value in ("models/nope", str(tmp_path / "nope"), "./nope", str(tmp_path / "nope.gguf")):
        with pytest.raises(SubqError, match="field 'model'.*does not exist"):
            run_train({**base, "model": value})
    with pytest.raises(SubqError, match="field 'init_from'.*does not exist"):
        run_train({**base, "model": tiny, "init_from": "runs/bc/final"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SubqError, match="HF_HUB_OFFLINE"):
        run_train({**base, "model": "gpt2"})
    (tmp_path / "parts").mkdir()
    with pytest.raises(SubqError, match="field 'data'.*empty directory"):
        run_train({**base, "model": tiny, "data": str(tmp_path / "parts")})
    assert attempts == [] and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- real runs (Ray Train + DeepSpeed on CPU)


@pytest.mark.slow
def test_filtered_bc_cli_trains_only_on_correct_sets(tmp_path, tiny, subq_bin):
    from subq.schema import write_parquet

    write_parquet(_rows(32, correct_every=4), str(tmp_path / "rows.parquet"))
    r = subprocess.run([subq_bin, "train", "--algo", "filtered_bc", "--data", str(tmp_path / "rows.parquet"),
                        "--model", tiny, "--steps", "3", "--batch-size", "4", "--num-workers", "1",
                        "--deepspeed", "zero1", "--val-fraction", "0", "--eval-problems", "0",
                        "--storage-path", str(tmp_path / "runs"), "--name", "fbc"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "RAY_ADDRESS": "local", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "ext" / "deepspeed_shm_comm").exists()  # a new install's first training builds no op
    out = json.loads(r.stdout)  # `subq train | jq .`: stdout is exactly one JSON line, nothing else
    assert r.stdout.count("\n") == 1
    assert out["data"]["used"] == 24 and out["data"]["filtered_out"] == 8
    # the terminal shows our lines (log path, progress), none of Ray's or DeepSpeed's internals
    assert "train filtered_bc" in r.stderr and "3/3" in r.stderr
    for noise in ("PlacementGroupCleaner", "core_worker", "[WARNING]", "ninja", "Token authentication", "(pid="):
        assert noise not in r.stderr, (noise, r.stderr[-2000:])
    assert out["metrics"]["step"] == 3 and out["metrics"]["zero_stage"] == 1
    assert (tmp_path / "runs" / "fbc" / "final" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


def _weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(str(path), "model.safetensors"))


@pytest.mark.slow
def test_bc_two_workers_zero2_overfits_32_examples(tmp_path, tiny, ray_local):
    import matplotlib.image as mpimg
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    from subq.schema import write_paper
    from training.decomposer import generate_subquestions, load_decomposer
    from training.train import run_train

    write_paper(_rows(32), str(tmp_path / "b32.json"), "paper_dataset")  # the paper's training-json format
    r = run_train(dict(algo="bc", data=str(tmp_path / "b32.json"), val_data=str(tmp_path / "b32.json"), model=tiny,
                       steps=80, batch_size=8, lr=6e-3, num_workers=2, deepspeed="zero2",
                       storage_path=str(tmp_path / "runs"), name="bc", checkpoint_every=40, log_every=10,
                       eval_problems=4, eval_max_new_tokens=48))
    history = json.loads((tmp_path / "runs" / "bc" / "metrics.json").read_text())
    losses = [h["loss"] for h in history]
    assert losses[0] > 5 and losses[-1] < 1.0, losses  # overfits
    m = r["metrics"]
    assert m["world_size"] == 2 and m["zero_stage"] == 2 and m["step"] == 80
    assert {"val_loss", "val_bleu", "val_num_subq"} <= set(m) and m["val_loss"] < 1.5
    assert (tmp_path / "runs" / "bc" / "metrics.csv").read_text().startswith("step,")
    assert mpimg.imread(str(tmp_path / "runs" / "bc" / "metrics.png")).shape[0] > 100
    final = r["final_dir"]
    model = AutoModelForCausalLM.from_pretrained(final)  # transformers alone
    AutoTokenizer.from_pretrained(final)
    assert model.config.n_layer == 2 and not os.path.exists(os.path.join(final, "ilql_heads.safetensors"))
    d = load_decomposer(final)
    assert not d.has_heads and d.text_format.name == "paper"
    gens = generate_subquestions(d, [row.problem for row in _rows(2)], max_new_tokens=48)
    assert all(g.completion_tokens > 0 for g in gens)
    assert r["best_dir"] and json.loads(open(os.path.join(r["best_dir"], "checkpoint.json")).read())["step"] == 80
    assert "val_no_eos_frac" in m
    shutil.copytree(final, tmp_path / "final_at_80")
    # --resume continues the finished run from its last checkpoint (step 80) to the new step budget, here on
    # other data (every sub-question "Banana banana banana?"): validation BLEU falls, so best/ stays at step 80
    banana = _rows(32)
    for row in banana:
        for st in row.sets:
            st.questions = ["Banana banana banana?"]
    write_paper(banana, str(tmp_path / "banana.json"), "paper_dataset")
    r2 = run_train(dict(algo="bc", data=str(tmp_path / "banana.json"), val_data=str(tmp_path / "b32.json"),
                        model=tiny, steps=90, batch_size=8, lr=6e-3, num_workers=2, deepspeed="auto",
                        storage_path=str(tmp_path / "runs"), name="bc", resume=True, checkpoint_every=40, log_every=2,
                        eval_problems=4, eval_max_new_tokens=48))
    assert r2["metrics"]["resumed_from_step"] == 80 and r2["metrics"]["step"] == 90
    assert r2["metrics"]["zero_stage"] == 2  # `auto` keeps the stage of the checkpoint it resumes from
    assert r2["metrics"]["val_bleu"] < m["val_bleu"] and r2["metrics"]["best_step"] == 80
    assert json.loads(open(os.path.join(r2["best_dir"], "checkpoint.json")).read())["step"] == 80
    best_w = _weights(r2["best_dir"])
    assert all(torch.equal(v, best_w[k]) for k, v in _weights(tmp_path / "final_at_80").items())  # weights came back
    assert any(not torch.equal(v, best_w[k]) for k, v in _weights(r2["final_dir"]).items())  # final/ is step 90
    assert load_decomposer(str(tmp_path / "runs" / "bc")).path == r2["best_dir"]  # a run dir loads its best/


@pytest.mark.slow
def test_ilql_dense_zero3_worker_killed_resumes_from_checkpoint(tmp_path, tiny, ray_local, monkeypatch):
    import torch

    from subq.schema import write_parquet
    from training.decomposer import generate_subquestions, load_decomposer
    from training.ilql import load_heads
    from training.train import FAULT_ENV, run_train

    write_parquet(_rows(16, correct_every=2, usefulness=True), str(tmp_path / "rows.parquet"))
    monkeypatch.setenv(FAULT_ENV, "5")  # rank 1 calls os._exit at step 5 on the first attempt
    r = run_train(dict(algo="ilql", rewards="dense", data=str(tmp_path / "rows.parquet"), model=tiny, steps=6,
                       batch_size=4, num_workers=2, deepspeed="zero3", storage_path=str(tmp_path / "runs"),
                       name="ilql", checkpoint_every=2, log_every=1, max_failures=1, val_fraction=0.1,
                       eval_problems=2, eval_max_new_tokens=8, ilql={"policy": "shared"}))
    m = r["metrics"]
    assert m["step"] == 6 and m["zero_stage"] == 3
    # restarted from a checkpoint (step 4, or step 2 if the controller had not yet registered step 4's report
    # when the worker died), not from scratch
    assert m["resumed_from_step"] in (2, 4)
    history = json.loads((tmp_path / "runs" / "ilql" / "metrics.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing repeated
    final = r["final_dir"]
    d = load_decomposer(final)
    assert d.has_heads and d.config["algo"] == "ilql" and d.config["rewards"] == "dense"
    heads, target = load_heads(final)
    assert heads.q1[2].weight.shape[0] == d.model.config.vocab_size
    assert generate_subquestions(d, ["Tom has 3 apples. How many?"], max_new_tokens=6, beta=1.0)[0].completion_tokens > 0
    assert r["label"] == "ilql-dense"
    base = _weights(tiny)
    assert any(not torch.equal(v, base[k]) for k, v in _weights(final).items())  # shared: the LM moved


@pytest.mark.slow
def test_ilql_policy_frozen_leaves_the_policy_bit_identical(tmp_path, tiny, ray_local):
    import torch

    from training.ilql import load_heads
    from training.train import run_train

    from subq.schema import write_parquet

    write_parquet(_rows(16, correct_every=2), str(tmp_path / "rows.parquet"))
    r = run_train(dict(algo="ilql", rewards="sparse", data=str(tmp_path / "rows.parquet"), model=tiny, steps=4,
                       batch_size=4, lr=1e-2, num_workers=1, storage_path=str(tmp_path / "runs"),
                       name="ilqlf", checkpoint_every=4, val_fraction=0, eval_problems=0,
                       ilql={"policy": "frozen", "lm_weight": 1.0}))
    assert r["label"] == "ilql-sparse" and r["metrics"]["step"] == 4
    # deepspeed `auto` (the default): the tiny model fits: ZeRO-0, and the run says why and in which precision
    info = json.loads(open(os.path.join(r["final_dir"], "checkpoint.json")).read())
    assert r["metrics"]["zero_stage"] == 0 and info["zero_stage_reason"].startswith("ZeRO-0: ")
    assert r["metrics"]["precision"] == "fp32" and info["precision_reason"] == "fp32 on CPU"
    base, after = _weights(tiny), _weights(r["final_dir"])
    assert base.keys() == after.keys() and all(torch.equal(v, base[k]) for k, v in after.items())
    heads, target = load_heads(r["final_dir"])  # the heads did learn (the Polyak target lags them)
    assert not torch.equal(heads.q1[0].weight, target.q1[0].weight)


# ---------------------------------------------------------------- one command-line definition


def _help_options(text: str) -> set[str]:
    import re

    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


@pytest.mark.parametrize("module,verb", [("training.train", "train"), ("training.init_model", "init-model"),
                                         ("pipelines.generate", "generate"), ("pipelines.serve", "serve"),
                                         ("pipelines.evaluate", "eval"), ("pipelines.demo", "demo"),
                                         ("pipelines.teacher_server", "teacher-server")])
def test_python_m_help_lists_the_same_options_as_the_subq_verb(module, verb):
    import sys

    from typer.testing import CliRunner

    from pipelines.cli import app
    from subq.cli_options import option_names
    from training.config import TrainConfig

    env = {**os.environ, "COLUMNS": "250", "TERMINAL_WIDTH": "250"}
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    verb_help = CliRunner().invoke(app, [verb, "--help"], env=env, terminal_width=250)
    assert verb_help.exit_code == 0
    assert _help_options(r.stdout) == _help_options(verb_help.output)
    if verb in ("train", "generate"):  # every config field is a flag, each shows its default
        import typer

        from pipelines.generate_config import GenerateConfig

        model = {"train": TrainConfig, "generate": GenerateConfig}[verb]
        cmd = typer.main.get_command(app).commands[verb]
        fields = {"--" + f.replace("_", "-") for f in model.model_fields}
        assert fields <= option_names(cmd) and fields <= _help_options(r.stdout)
        extra = {o for o in option_names(cmd) - fields if not o.startswith("--no-")}
        assert extra <= {"--config", "--ray-address"}, extra
        shown = r.stdout.count("[default:")
        required = sum(1 for f in model.model_fields.values() if f.is_required())
        assert shown >= len(model.model_fields) - required - 1  # ilql lists its keys' defaults instead


def test_metrics_plot_one_quantity_per_axis_best_step_and_overfitting(tmp_path):
    import matplotlib.image as mpimg

    from training.train.metrics import _write_metrics, metric_panels, overfitting_note

    history = [{"step": s, "loss": 5.0 / s, "val_loss": vl, "val_bleu": b, "val_num_subq": 2.0,
                "val_ref_num_subq": 3.0, "val_no_eos_frac": 0.25, "best_step": bs}
               for s, vl, b, bs in [(10, 3.0, 5.0, 10), (20, 2.0, 12.0, 20), (30, 2.6, 9.0, 20)]]
    panels = dict(metric_panels(history))
    assert panels["val BLEU"] == ["val_bleu"] and "val_bleu" not in panels["#sub-questions"]
    assert set(panels["loss"]) == {"loss", "val_loss"} and panels["no-EOS share"] == ["val_no_eos_frac"]
    note = overfitting_note(history)
    assert note and "step 20" in note and "step 30" in note
    assert overfitting_note(history[:2]) is None  # still falling
    _write_metrics(str(tmp_path), history)
    assert mpimg.imread(str(tmp_path / "metrics.png")).shape[1] > 600  # four panels side by side
