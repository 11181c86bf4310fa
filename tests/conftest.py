"""Shared test fixtures. Paths to the vendored data; the repo's own copy, never ../shared at run time."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "subq" / "data"
SUBQ_DIR = DATA / "gsm8k-ai-subq"
RAW_TEST = SUBQ_DIR / "qg_test_data_raw.jsonl"
DATASET_TEST = SUBQ_DIR / "qg_test_dataset.jsonl"
CHAT_TEST = SUBQ_DIR / "test_chat.jsonl"
SUBQ_BIN = str(Path(sys.executable).parent / "subq")

# Tests must never reach a real provider with a real key.
os.environ.pop("OPENAI_API_KEY", None)

# Each pytest-xdist worker keeps its own Ray world: `ray.init()` with no address joins the Ray that `ray start` last
# recorded in Ray's temp dir (`ray_current_cluster`), so a verb started by one worker's test would join (and hang on,
# once it is gone) a cluster another worker's test started. Ray reads its temp root from RAY_TMPDIR; subprocesses
# inherit it. Short paths: Ray's AF_UNIX socket paths live under it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["RAY_TMPDIR"] = f"/tmp/rt-{os.environ['PYTEST_XDIST_WORKER']}"
    os.makedirs(os.path.join(os.environ["RAY_TMPDIR"], "ray"), exist_ok=True)


@pytest.fixture
def subq_bin() -> str:
    """The installed `subq` console script of this interpreter's environment."""
    return SUBQ_BIN


def local_ray(**kw):
    """ray.init of a small local Ray for one test module (2 CPUs, 150 MB object store, no dashboard). On a saturated
    machine the raylet can miss Ray's fixed 30 s start window: tried up to three times."""
    import ray

    args = dict(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False, **kw)
    for attempt in range(3):
        try:
            return ray.init(**args)
        except Exception as e:  # noqa: BLE001
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == 2:
                raise


def subq_generate(subq_bin: str, *args, key: str = "unused", progress_s: float = 2, timeout: float = 300,
                  check: bool = True):
    """`subq generate ARGS` on 2 Ray CPUs: its stdout JSON summary (check=True, asserting exit 0) or the process."""
    import json
    import subprocess

    env = {**os.environ, "OPENAI_API_KEY": key}
    r = subprocess.run([subq_bin, "generate", "--ray-num-cpus", "2", "--progress-interval-s", str(progress_s), *args],
                       capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])
    return r


_EXIT_STATUS: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Remember pytest's exit status, and stop a Ray this process may still hold (every module fixture stops its own;
    this covers one that failed half-way)."""
    _EXIT_STATUS.append(int(exitstatus))
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's own exit status once everything is reported, without the interpreter's finalization:
    Ray's C++ threads (and Serve's, Ray Data's, gloo's) that outlive `ray.shutdown()` in this process may call into
    Python while it is being torn down (PyGILState_Ensure in a finalizing interpreter: SIGSEGV, ray-project/ray
    #47864). CI saw it once, after 371 tests passed: exit 139. Results and reports are written by now; only the exit
    code would change, and here it is pytest's."""
    # (not in an xdist worker: it reports to the controller until its interpreter ends)
    if _EXIT_STATUS and not os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("SUBQ_TEST_NORMAL_EXIT") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
