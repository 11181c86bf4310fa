"""Where user-facing output goes: one home for "quiet by default".

A long-running verb (`generate`, `train`, `serve`, `eval`, `demo`) calls `activate("<verb>")` at the start of its
body. Unless `--verbose` (or `SUBQ_VERBOSE=1`) was given, that points the process's file descriptors 1 and 2 at a
per-run log file, so everything Ray, DeepSpeed, Serve, ninja builds and C++ cores print lands there, and keeps
private copies of the terminal's stdout/stderr for our own output:

- `console.out()` : the documented machine-readable stdout (one JSON line; `emit_json`);
- `console.err()` : stage lines, progress bars, warnings and `error:` lines (`echo`);
- `console.log_path()` : the run's log file (printed once on the terminal as `logs: PATH`).

Child processes inherit descriptors 1 and 2, so their output goes to the log too. Code called in-process (tests,
notebooks) without `activate` writes to `sys.stdout` / `sys.stderr` as usual. Log directory: `$SUBQ_LOG_DIR`,
else `~/.cache/subq/logs`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Optional

_verbose: bool = False
_term_out: Optional[IO[str]] = None
_term_err: Optional[IO[str]] = None
_log_path: Optional[Path] = None


def set_verbose(value: bool) -> None:
    """Set by the root `--verbose` flag."""
    global _verbose
    _verbose = bool(value)


def verbose() -> bool:
    return _verbose or os.environ.get("SUBQ_VERBOSE", "").lower() in ("1", "true", "yes")


def log_dir() -> Path:
    return Path(os.environ.get("SUBQ_LOG_DIR") or Path.home() / ".cache" / "subq" / "logs")


def activate(verb: str) -> Optional[Path]:
    """Send fds 1/2 to a per-run log file (unless verbose); return its path. Idempotent."""
    global _term_out, _term_err, _log_path
    if _log_path is not None or verbose():
        return _log_path
    d = log_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{verb}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    out_fd, err_fd = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _term_out = os.fdopen(out_fd, "w", buffering=1)
    _term_err = os.fdopen(err_fd, "w", buffering=1)
    _log_path = path
    echo(f"logs: {path}  (Ray/DeepSpeed/Serve output; --verbose shows it here)")
    return path


def log_path() -> Optional[Path]:
    return _log_path


def out() -> IO[str]:
    """The terminal's stdout (only documented machine-readable output goes here)."""
    return _term_out or sys.stdout


def err() -> IO[str]:
    """The terminal's stderr: stage lines, progress, warnings, errors."""
    return _term_err or sys.stderr


def echo(msg: str = "") -> None:
    print(msg, file=err(), flush=True)


def emit_json(obj: Any) -> None:
    """The one JSON line a verb documents on stdout."""
    print(json.dumps(obj, default=str), file=out(), flush=True)


def is_terminal() -> bool:
    try:
        return err().isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(**kwargs):
    """A tqdm bar on the terminal's stderr; in a log file or pipe, a plain line every 30 s instead of one long
    line of carriage returns."""
    from tqdm import tqdm

    kwargs.setdefault("file", err())
    kwargs.setdefault("dynamic_ncols", True)
    if not is_terminal():
        kwargs.setdefault("mininterval", 30)
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("ncols", 100)
    return tqdm(**kwargs)
