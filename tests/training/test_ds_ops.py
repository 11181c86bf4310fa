"""Stale torch-extension build locks (left by a killed DeepSpeed op build) never mean a silent hang: a lock with no
live builder is cleared; one with a builder at work is left and reported with the fix; a start-up stage that runs
past its limit fails naming the stage and the lock to remove. No Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


def _lock(root, name, age_s):
    d = root / name
    d.mkdir(parents=True)
    lock = d / "lock"
    lock.write_text("")
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_stale_lock_is_cleared_and_a_live_builder_is_left(tmp_path, monkeypatch):
    from training.ds_ops import clear_stale_locks, extensions_dir

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_dir() == tmp_path
    stale = _lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    busy = _lock(tmp_path, "other_op", age_s=3600)
    fresh = _lock(tmp_path, "third_op", age_s=0)
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=busy.parent)
    try:
        time.sleep(0.5)
        removed, live = clear_stale_locks()
    finally:
        builder.kill()
        builder.wait()
    assert removed == [stale] and not stale.exists()
    assert sorted(live) == sorted([busy, fresh]) and busy.exists() and fresh.exists()


def test_torch_waiting_on_a_held_lock_fails_naming_the_stage_and_the_fix(tmp_path, monkeypatch):
    """torch's own FileBaton wait (what a worker runs into) under stage_timeout: a clear error, not a hang."""
    from torch.utils.file_baton import FileBaton

    from training.ds_ops import StageTimeout, lock_hint, stage_timeout

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _lock(tmp_path, "deepspeed_shm_comm", age_s=0)  # held (too young to call stale)
    baton = FileBaton(str(lock))
    assert not baton.try_acquire()
    with pytest.raises(StageTimeout) as e:
        with stage_timeout("DeepSpeed init_distributed", 1.5, hint=lock_hint):
            baton.wait()  # torch waits here forever while the lock exists
    msg = str(e.value)
    assert "DeepSpeed init_distributed" in msg and f"rm {lock}" in msg


def test_deepspeed_builds_no_cpu_comm_op_for_training(tmp_path, monkeypatch):
    """DeepSpeed's own op loader, as `init_distributed` calls it on CPU: with subq's skip it builds nothing (before:
    a 70-110 s JIT build of an op only tensor-parallel inference uses, on every new install's first training)."""
    code = ("import os, sys; os.environ['DS_ACCELERATOR'] = 'cpu'\n"
            "from training.ds_ops import skip_unused_cpu_ops\n"
            "if sys.argv[1] == 'skip': skip_unused_cpu_ops()\n"
            "from deepspeed.comm.torch import build_shm_op\n"
            "print('op', build_shm_op())\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CXX": "/bin/false", "CC": "/bin/false"}
    r = subprocess.run([sys.executable, "-c", code, "skip"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "op None" in r.stdout, r.stderr[-2000:]
    assert not (tmp_path / "ext" / "deepspeed_shm_comm").exists()
    # without the skip DeepSpeed sets out to build it (here with a compiler that refuses, so it fails at once)
    r = subprocess.run([sys.executable, "-c", code, "noskip"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 or "op None" not in r.stdout
    assert (tmp_path / "ext" / "deepspeed_shm_comm").exists()
