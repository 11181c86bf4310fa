"""DeepSpeed's JIT-compiled ops on CPU and torch's extension `lock` files: no build nobody uses, never a silent wait.

On CPU, `deepspeed.init_distributed` JIT-compiles its shared-memory communication op (`deepspeed_shm_comm`) with
torch's cpp_extension (70-110 s on 2 cores, once per environment) for `inference_all_reduce` alone: tensor-parallel
inference, which training never calls (its all-reduces are torch.distributed's over gloo). `skip_unused_cpu_ops()`
tells DeepSpeed the op is not available, so a first training on a new install starts at once (before 2026-12-07
it paid that build; `subq doctor --build-ops` existed to pay it up front). Builds that do happen (other ops, other
tools) live under `$TORCH_EXTENSIONS_DIR` (default `<venv>/torch_extensions/`, see use_own_extensions_dir); torch
guards each with a `lock` file and every later process waits on it with no timeout, so a process killed during a
build leaves a lock behind and every later user of that op hangs. So before training:

- `clear_stale_locks()`: removes each extension `lock` with no live builder (no process working in that
  extension's directory and the lock older than `grace_s`), and returns the ones it could not judge stale with the
  exact command that removes them;
- `stage_timeout(...)`: a start-up stage that runs past its limit fails naming the stage and the lock to remove.

    from training.ds_ops import clear_stale_locks, skip_unused_cpu_ops
    removed, live = clear_stale_locks()
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

CPU_COMM_OP = "deepspeed_shm_comm"


def extensions_dir() -> Path:
    """torch's JIT extension root: $TORCH_EXTENSIONS_DIR, else this Python environment's own
    (<sys.prefix>/torch_extensions, see use_own_extensions_dir)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path(sys.prefix) / "torch_extensions"


def use_own_extensions_dir() -> Path:
    """Point torch's JIT builds at this Python environment's own directory unless TORCH_EXTENSIONS_DIR is set.
    torch's default (~/.cache/torch_extensions) is shared by every install on the machine: two installs with
    different paths rebuild the same op in turn over each other (and wait on each other's locks)."""
    d = extensions_dir()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(d))
    return d


def skip_unused_cpu_ops() -> None:
    """Before `deepspeed.init_distributed` on CPU: mark the shared-memory communication op unavailable, so DeepSpeed
    neither builds nor loads it (`deepspeed.comm.torch.build_shm_op` returns None; all-reduces stay
    torch.distributed's). The op serves `inference_all_reduce` only, which training never calls."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[CPU_COMM_OP] = False  # DeepSpeed's own per-process table of usable ops


def _busy_dirs() -> list[Path]:
    """Working directories of live processes (a builder runs ninja/c++ inside the extension directory)."""
    out = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            out.append(Path(os.readlink(p / "cwd")))
        except OSError:
            continue
    return out


def clear_stale_locks(root: Path | None = None, grace_s: float = 120.0) -> tuple[list[Path], list[Path]]:
    """(removed stale locks, locks left because a builder may still be at work). A lock is stale when it is
    older than grace_s and no live process has its working directory inside that extension's directory."""
    root = root or extensions_dir()
    removed, live = [], []
    if not root.is_dir():
        return removed, live
    busy = _busy_dirs()
    now = time.time()
    for lock in sorted(root.glob("*/lock")):
        ext = lock.parent.resolve()
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        working = any(b == ext or ext in b.parents for b in busy)
        if age >= grace_s and not working:
            lock.unlink(missing_ok=True)
            removed.append(lock)
        else:
            live.append(lock)
    return removed, live


def lock_fix(lock: Path) -> str:
    return f"rm {lock}  (only if no other training run is building it)"


class StageTimeout(RuntimeError):
    """A training start-up stage ran past its time limit."""


class stage_timeout:
    """`with stage_timeout("DeepSpeed init", 600, hint=...):` raises StageTimeout in this thread, naming the stage
    (and the hint), when the block runs longer than `seconds` (delivered at the next Python bytecode, e.g. inside
    torch's lock-wait loop). seconds <= 0: no limit."""

    def __init__(self, name: str, seconds: float, hint=""):
        self.name, self.seconds, self.hint = name, seconds, hint
        self._timer = None

    def _fire(self, ident: int) -> None:
        import ctypes

        msg = f"training start-up stuck in stage '{self.name}' for {self.seconds:.0f} s"
        hint = self.hint() if callable(self.hint) else self.hint  # a callable: judged when the time is up
        if hint:
            msg += f"; {hint}"
        _PENDING[ident] = msg
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(StageTimeout))

    def __enter__(self):
        import threading

        if self.seconds > 0:
            self._timer = threading.Timer(self.seconds, self._fire, args=(threading.get_ident(),))
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        import threading

        if self._timer is not None:
            self._timer.cancel()
        msg = _PENDING.pop(threading.get_ident(), None)
        if exc_type is StageTimeout and msg:
            raise StageTimeout(msg) from None
        return False


_PENDING: dict[int, str] = {}


def lock_hint() -> str:
    removed, live = clear_stale_locks(grace_s=float("inf"))  # report only: list every lock present
    locks = live
    if not locks:
        return "no torch extension lock is held; see the run's log for the worker's last lines"
    return "a torch extension build lock is held: " + "; ".join(lock_fix(x) for x in locks)
