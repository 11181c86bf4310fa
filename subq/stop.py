"""How a `subq` command stops: Ctrl-C (SIGINT) and SIGTERM (supervisors, Kubernetes, `ray job stop`) the same
way, every time, whatever the command is doing.

`install()` (called first thing by `subq.cli_options.run`, the console script's runner) makes both signals raise in the main thread: SIGINT raises
KeyboardInterrupt, SIGTERM raises `Terminated` (a KeyboardInterrupt), so every `except KeyboardInterrupt` stop path
serves both: `generate` keeps its finished rows and writes its summary, `--api batch` leaves its batches running at
the provider (resumable), `serve` answers the requests in flight and shuts Serve down. Exit codes (`exit_code`):
130 after SIGINT, 143 after SIGTERM (128 + the signal's number); `serve` exits 0 after a clean drain.

Why Python's default handler is not enough:

1. A signal handler runs at the main thread's next bytecode boundary, which can be inside a finalizer or a weakref
   callback, e.g. importlib's module-lock callback (`_get_module_lock.<locals>.cb`) that runs at the end of an
   import. An exception raised there is printed as "Exception ignored in ..." and dropped: the command goes on as
   if no signal had come (issue 24: `generate --api batch` still polling 60 s after Ctrl-C, once in ~30 runs).
   Here every stop is recorded before it is raised; `sys.unraisablehook` sends a dropped one to the main thread
   again, and the long loops (batch polling, the online pipeline, `serve`) call `check()`, which raises a recorded
   stop, so even an interrupt swallowed by code we do not own stops the command at its next poll.
2. `ray.init` replaces SIGTERM's handler: with `sys.exit`, or, when it starts a local Ray, with one that kills
   Ray's processes first, so whatever cleanup runs next (Serve's shutdown) dies with SIGABRT. `reinstall()`, called
   by `cluster.connect.init_ray` after `ray.init`, puts ours back.

Code run in-process (tests, notebooks) never calls `install()`: there nothing changes and `check()` never raises.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Optional


class Terminated(KeyboardInterrupt):
    """SIGTERM: stop as after Ctrl-C (a KeyboardInterrupt, so every Ctrl-C stop path handles it)."""

    signum = signal.SIGTERM


_installed = False
_requested: Optional[int] = None  # the first stop signal received (None: none)
_count = 0  # stop signals received
_prev_unraisable = None
_resends = 0


def _exc_for(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum, frame) -> None:
    global _requested, _count
    _count += 1
    if _requested is None:
        _requested = signum
    raise _exc_for(signum)


def _resend(signum: int) -> None:
    """Deliver a dropped stop to the main thread again, from a helper thread once the finalizer that dropped it has
    returned (a signal sent to the main thread also wakes a blocking call there)."""
    import time

    time.sleep(0.05)
    try:
        signal.pthread_kill(threading.main_thread().ident, signum)
    except (OSError, ValueError, RuntimeError):  # the interpreter is going away
        pass


def _unraisable(u) -> None:
    global _resends
    if u.exc_type is not None and issubclass(u.exc_type, KeyboardInterrupt) and _requested is not None:
        _resends += 1
        try:
            threading.Thread(target=_resend, args=(_requested,), name="subq-stop-resend", daemon=True).start()
        except RuntimeError:  # the interpreter is going away
            pass
    (_prev_unraisable or sys.__unraisablehook__)(u)


def _exit_now(signum, frame) -> None:
    import os

    os.write(2, f"\nstopped ({'SIGTERM' if signum == signal.SIGTERM else 'Ctrl-C'})\n".encode())
    os._exit(128 + signum)


def install_early() -> None:
    """For the `subq` console script, before its imports: nothing has started yet and nothing needs cleaning up, so
    a stop signal ends the process at once with its exit code (an exception raised in the middle of an import
    would end it with a traceback and exit 1, or be lost in an import's callback). `install()` replaces it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_now)
        signal.signal(signal.SIGTERM, _exit_now)


_saved: dict = {}  # the handlers install() replaced, for uninstall()


def install() -> None:
    """Make SIGINT and SIGTERM stop this process as described above (main thread only; idempotent)."""
    global _installed, _prev_unraisable
    if threading.current_thread() is not threading.main_thread():
        return
    if not _installed:
        _saved.update({sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)})
    if sys.unraisablehook is not _unraisable:
        _prev_unraisable = sys.unraisablehook
        sys.unraisablehook = _unraisable
    _installed = True
    reinstall()


def uninstall() -> None:
    """Undo install() (subq.cli_options.run does when it returns, so calling it in-process leaves the caller as it was)."""
    global _installed, _requested, _count
    if not _installed or threading.current_thread() is not threading.main_thread():
        return
    for sig, h in _saved.items():
        if h is not None:
            signal.signal(sig, h)
    _saved.clear()
    if sys.unraisablehook is _unraisable:
        sys.unraisablehook = _prev_unraisable or sys.__unraisablehook__
    _installed, _requested, _count = False, None, 0


def reinstall() -> None:
    """Put our handlers back where a library replaced them (ray.init does for SIGTERM). No-op unless `install()`
    ran in this process, and off the main thread."""
    if not _installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not _handler:
            signal.signal(sig, _handler)


def installed() -> bool:
    return _installed


def requested() -> Optional[int]:
    """The stop signal received, if any (None also when `install()` never ran)."""
    return _requested


def check() -> None:
    """Raise the recorded stop (KeyboardInterrupt or Terminated), if there is one: for long loops, so a stop whose
    exception was swallowed on its way still ends them."""
    if _requested is not None:
        raise _exc_for(_requested)


def sleep(seconds: float) -> None:
    """time.sleep that raises a recorded stop first and when it ends."""
    import time

    check()
    time.sleep(seconds)
    check()


def exit_code(exc: BaseException) -> int:
    """130 after Ctrl-C (SIGINT), 143 after SIGTERM: 128 + the signal's number, as a shell reports it."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def describe(exc: BaseException) -> str:
    return "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"


def while_draining() -> None:
    """From now on a repeated SIGTERM is recorded but raises nothing (a supervisor's second SIGTERM must not cut
    a drain short); SIGINT still raises (a second Ctrl-C forces the stop)."""
    if not _installed or threading.current_thread() is not threading.main_thread():
        return

    def quiet(signum, frame):
        global _count
        _count += 1

    signal.signal(signal.SIGTERM, quiet)
