"""`subq doctor`: check this machine for the three pipelines and say what was found, one line per check.

    subq doctor              # versions, Ray start-up, DeepSpeed ops, torch threads, memory, disk, GPU, auth, keys
    subq doctor --build-ops  # also build DeepSpeed's CPU communication op now (a one-time cost, ~1-2 min on 2 cores)
    subq doctor --json       # the same as one JSON object

Each check is `ok`, `warn` (works, but read the detail) or `fail` (a pipeline will not run); the exit code is 1 when any
check failed. Key and token values are never printed, only where they were found.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import typer

PACKAGES = ("subq", "ray", "torch", "transformers", "deepspeed", "openai", "pyarrow", "pydantic")


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def check_versions() -> Check:
    found, missing = [], []
    for p in PACKAGES:
        try:
            found.append(f"{p} {md.version(p)}")
        except md.PackageNotFoundError:
            missing.append(p)
    detail = f"python {sys.version.split()[0]}; " + ", ".join(found)
    return Check("packages", "fail" if missing else "ok", detail + (f"; missing: {', '.join(missing)}" if missing else ""))


def check_ray() -> Check:
    """Start (and stop) a private local Ray instance: what every local verb does first."""
    import ray

    if ray.is_initialized():
        return Check("ray", "ok", "already initialized in this process")
    addr = os.environ.get("RAY_ADDRESS", "")
    t0 = time.time()
    try:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        res = ray.cluster_resources()
    except Exception as e:  # noqa: BLE001 - report any start-up failure
        return Check("ray", "fail", f"a local Ray did not start: {type(e).__name__}: {e}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
    note = f"; RAY_ADDRESS={addr!r} is set" if addr else ""
    return Check("ray", "ok", f"local instance started in {time.time() - t0:.1f}s ({res.get('CPU', 0):.0f} CPU){note}")


def check_deepspeed_ops(build: bool = False) -> Check:
    """DeepSpeed's CPU shared-memory communication op: built once per machine, on first training if not before
    (training.ds_ops holds the rules: where torch builds it, and when a build `lock` is stale)."""
    try:
        import deepspeed.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return Check("deepspeed ops", "fail", f"deepspeed does not import: {type(e).__name__}: {e}")
    from training.ds_ops import BUILD_SECONDS, CPU_COMM_OP, clear_stale_locks, extensions_dir, lock_fix, op_built

    ext = extensions_dir() / CPU_COMM_OP
    removed, held = clear_stale_locks()
    cleared = f"; removed a stale build lock left by a killed build ({removed[0]})" if removed else ""
    if op_built():
        return Check("deepspeed ops", "ok", f"CPU comm op built ({ext}){cleared}")
    if held:
        return Check("deepspeed ops", "warn", f"a build lock is held ({held[0]}): a build is running now, or one was "
                     f"killed less than 2 minutes ago; if no training is running: {lock_fix(held[0])}")
    if not build:
        return Check("deepspeed ops", "warn", f"CPU comm op not built yet: the first CPU training builds it (about "
                     f"{BUILD_SECONDS} on 2 cores, once per machine); `subq doctor --build-ops` builds it now{cleared}")
    t0 = time.time()
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    r = subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0 or not op_built():
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:]
        return Check("deepspeed ops", "fail", f"building the CPU comm op failed (exit {r.returncode}): {tail}")
    return Check("deepspeed ops", "ok", f"CPU comm op built in {time.time() - t0:.0f}s at {ext}{cleared}")


def check_torch_threads() -> Check:
    import torch

    n, cpus = torch.get_num_threads(), os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS")
    status = "warn" if n > cpus else "ok"
    return Check("torch threads", status, f"torch uses {n} threads on {cpus} CPUs"
                 + (f" (OMP_NUM_THREADS={omp})" if omp else "") + ("; more threads than CPUs" if n > cpus else ""))


def check_memory() -> Check:
    import psutil

    vm = psutil.virtual_memory()
    gib = vm.available / 2**30
    status = "fail" if gib < 2 else "warn" if gib < 6 else "ok"
    return Check("memory", status, f"{gib:.1f} GiB available of {vm.total / 2**30:.1f} GiB"
                 + ("; the demo needs ~6 GiB" if gib < 6 else ""))


def check_disk() -> Check:
    free = shutil.disk_usage(Path.home()).free / 2**30
    status = "fail" if free < 2 else "warn" if free < 10 else "ok"
    return Check("disk", status, f"{free:.1f} GiB free under {Path.home()} (Ray's object spilling, checkpoints, caches)")


def check_gpu() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("gpu", "ok", "none visible: training and serving run on CPU (gloo, fp32)")
    from training.config import native_bf16

    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cap = "{}.{}".format(*torch.cuda.get_device_capability(0))
    bf16 = native_bf16(0)  # not torch.cuda.is_bf16_supported(): True on T4/V100, which only emulate bf16
    detail = (f"{len(names)} x {names[0]} (compute capability {cap}); bf16 "
              + ("native: training (bf16 \"auto\") and serving use bf16" if bf16 else
                 "NOT native (needs 8.0; torch only emulates it): training uses fp32 (fp16 if the DeepSpeed config "
                 "enables it), serving fp32"))
    return Check("gpu", "ok" if bf16 else "warn", detail)


def check_auth() -> Check:
    from cluster.auth import find_token

    tok = find_token()
    mode = os.environ.get("RAY_AUTH_MODE", "token (Ray 2.60 default)")
    if tok is None:
        return Check("ray auth", "ok", f"auth mode {mode}; no cluster token found (needed only for `subq submit` / "
                     "`subq jobs` against a cluster: `ray get-auth-token` on its head)")
    return Check("ray auth", "ok", f"auth mode {mode}; cluster token found ({tok!r})")


def check_keys() -> Check:
    found = [k for k in ("OPENAI_API_KEY",) if os.environ.get(k)]
    return Check("teacher key", "ok", "OPENAI_API_KEY is set (value not shown)" if found else
                 "OPENAI_API_KEY is not set: fine offline (the local teacher server); a real --base-url needs it")


CHECKS: list[Callable[[], Check]] = [check_versions, check_ray, check_torch_threads, check_memory, check_disk,
                                      check_gpu, check_auth, check_keys]


def run_checks(build_ops: bool = False) -> list[Check]:
    out = []
    for fn in CHECKS[:2] + [lambda: check_deepspeed_ops(build_ops)] + CHECKS[2:]:
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check, not a crashed doctor
            out.append(Check(getattr(fn, "__name__", "check").removeprefix("check_"), "fail", f"{type(e).__name__}: {e}"))
    return out


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(
        build_ops: bool = typer.Option(False, "--build-ops", help="Build DeepSpeed's CPU communication op now (one-time, ~1-2 min)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    ) -> None:
        """Check this machine for subq: packages, a local Ray start, DeepSpeed ops, torch threads, memory, disk, GPU,
        Ray token auth and the teacher key (values never shown). Exit code 1 when a check fails."""
        from subq import console

        console.activate("doctor")
        checks = run_checks(build_ops)
        if as_json:
            console.emit_json({"checks": [asdict(c) for c in checks], "ok": all(c.status != "fail" for c in checks)})
        else:
            for c in checks:
                print(f"{c.status:<5} {c.name:<14} {c.detail}", file=console.out())
        if any(c.status == "fail" for c in checks):
            raise typer.Exit(1)
