"""`subq doctor`: check this machine for the three pipelines and say what was found, one line per check.

    subq doctor              # versions, Ray start-up, DeepSpeed ops, torch threads, memory, disk, GPU, auth, keys
    subq doctor --json       # the same as one JSON object

Each check is `ok`, `warn` (works, but read the detail) or `fail` (a pipeline will not run); the exit code is 1 when any
check failed. Key and token values are never printed, only where they were found.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
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


def check_deepspeed_ops() -> Check:
    """DeepSpeed imports, and no torch extension build lock is left behind (training builds no op on CPU: it skips
    the inference-only shm comm op; training.ds_ops holds the rules: where torch builds, when a `lock` is stale)."""
    try:
        import deepspeed.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return Check("deepspeed ops", "fail", f"deepspeed does not import: {type(e).__name__}: {e}")
    from training.ds_ops import clear_stale_locks, extensions_dir, lock_fix

    removed, held = clear_stale_locks()
    cleared = f"; removed a stale build lock left by a killed build ({removed[0]})" if removed else ""
    if held:
        return Check("deepspeed ops", "warn", f"a build lock is held ({held[0]}): a build is running now, or one was "
                     f"killed less than 2 minutes ago; if no build is running: {lock_fix(held[0])}")
    return Check("deepspeed ops", "ok", f"nothing to build for training (torch Adam; the inference-only CPU comm op is "
                 f"skipped); no build lock under {extensions_dir()}{cleared}")


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


CHECKS: list[Callable[[], Check]] = [check_versions, check_ray, check_deepspeed_ops, check_torch_threads,
                                      check_memory, check_disk,
                                      check_gpu, check_auth, check_keys]


def run_checks() -> list[Check]:
    out = []
    for fn in CHECKS:
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check, not a crashed doctor
            out.append(Check(getattr(fn, "__name__", "check").removeprefix("check_"), "fail", f"{type(e).__name__}: {e}"))
    return out


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    ) -> None:
        """Check this machine for subq: packages, a local Ray start, DeepSpeed ops, torch threads, memory, disk, GPU,
        Ray token auth and the teacher key (values never shown). Exit code 1 when a check fails."""
        from subq import console

        console.activate("doctor")
        checks = run_checks()
        if as_json:
            console.emit_json({"checks": [asdict(c) for c in checks], "ok": all(c.status != "fail" for c in checks)})
        else:
            for c in checks:
                print(f"{c.status:<5} {c.name:<14} {c.detail}", file=console.out())
        if any(c.status == "fail" for c in checks):
            raise typer.Exit(1)
