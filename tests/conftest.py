"""Shared test fixtures. Paths to the vendored data; the repo's own copy, never ../shared at run time."""

from __future__ import annotations

import contextlib
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
    """ray.init of a small local Ray for one test module (2 CPUs, 150 MB object store, no dashboard), or of the
    module's shared head when the module runs on one (`cli_ray`: RAY_ADDRESS is set). On a saturated machine the
    raylet can miss Ray's fixed 30 s start window: tried up to three times."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        return ray.init(address=address, log_to_driver=False, **{k: v for k, v in kw.items() if k == "namespace"})
    args = dict(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False, **kw)
    for attempt in range(3):
        try:
            return ray.init(**args)
        except Exception as e:  # noqa: BLE001
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == 2:
                raise


def free_port() -> int:
    """A free TCP port on 127.0.0.1: the project's own (`pipelines.teacher_server.free_port`), imported on first use
    (it brings FastAPI)."""
    from pipelines.teacher_server import free_port as project_free_port

    return project_free_port()


def own_processes(*markers: str) -> list:
    """This machine's processes (not this one) whose command line holds one of `markers`: a test's own Ray, found
    by its temp dir or GCS address."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if p.info["pid"] != os.getpid() and any(m in cmd for m in markers):
            out.append(p)
    return out


def stop_own_processes(*markers: str, wait_s: float = 10) -> None:
    """Stop only a test's own processes (`own_processes`): SIGTERM, up to wait_s, then SIGKILL. Never `ray stop`:
    it stops every Ray of the user, other tests' included."""
    import psutil

    procs = own_processes(*markers)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    for p in alive + own_processes(*markers):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@contextlib.contextmanager
def ray_head(num_cpus: int = 2):
    """A Ray head for CLI runs to join: yields the environment a driver needs (RAY_ADDRESS, RAY_AUTH_MODE).
    `ray start` in its own temp dir (so no `ray.init()` finds it unasked), with Ray's default token auth, the mode
    every driver of this process tree has once it has called ray.init (Ray sets RAY_AUTH_MODE=token in
    os.environ then; a driver and a head that disagree fail at the first actor); stopped by killing its own
    processes, never with `ray stop` (that stops every Ray of the user)."""
    import shutil
    import subprocess

    root = f"/tmp/rh-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{os.getpid()}-{free_port()}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}",
           "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={root}",
           "--node-ip-address=127.0.0.1", f"--object-store-memory={300 * 1024**2}"]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token"}
    finally:  # a few seconds of grace, then SIGKILL: some of the head's processes outwait any SIGTERM grace (a 10 s
        stop_own_processes(root, wait_s=3)  # wait was the whole of 6 module teardowns)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cli_ray():
    """One Ray head (`ray_head`) for a test module's CLI runs: `subq generate`, `subq eval`, ... join it through
    RAY_ADDRESS (set for the module) instead of each starting and stopping a local Ray (on 2 cores: 10.6 s and
    12.4 CPU-s for a 4-problem `subq generate` that starts its own, 4.3 s and 5.1 CPU-s joined). Its workers do not
    have the test's environment, as on a real cluster. A test that must own its Ray sets RAY_ADDRESS=local."""
    with ray_head() as head_env:
        before = {k: os.environ.get(k) for k in head_env}
        os.environ.update(head_env)
        try:
            yield head_env["RAY_ADDRESS"]
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


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


# Seconds each test file took in a clean-clone run on 2 cores (`pytest --durations=0`, summed per file; files under
# 15 s are left out). xdist's loadfile mode hands out whole files in collection order (`--no-loadscope-reorder` in
# pyproject.toml; its default orders them by test count, which left the two longest single-test files, the demo and
# the README walk-through, for last: one worker ran them while the other sat idle, ~300 s of a 1,507 s run). Longest
# first keeps the workers' ends together. Only the order depends on these numbers, never a result.
FILE_SECONDS = {
    "training/test_train.py": 240,
    "cluster/test_cluster_jobs.py": 226,
    "e2e/test_demo.py": 204,
    "e2e/test_readme.py": 195,
    "e2e/test_autoscaling.py": 171,
    "pipelines/generate/test_generate_robust.py": 147,
    "pipelines/generate/test_generate.py": 142,
    "training/test_distributed_equivalence.py": 130,
    "pipelines/serve/test_serve.py": 116,
    "training/test_train_gpu_paths.py": 108,
    "pipelines/serve/test_serve_team.py": 107,
    "subq/test_stop.py": 106,
    "pipelines/test_cluster_check.py": 101,
    "pipelines/evaluate/test_evaluate_e2e.py": 98,
    "pipelines/generate/test_generate_batch.py": 94,
    "pipelines/serve/test_openai_compat.py": 83,
    "training/test_ilql.py": 80,
    "pipelines/generate/test_generate_billing.py": 66,
    "pipelines/evaluate/test_two_stage.py": 62,
    "actors/test_rate_limit_stack.py": 48,
    "training/test_preflight.py": 46,
    "pipelines/serve/test_serve_cli.py": 46,
    "e2e/test_cluster_multinode.py": 40,
    "actors/test_limiter.py": 34,
    "actors/test_limiter_placement.py": 32,
    "pipelines/teacher_server/test_teacher_server.py": 22,
    "training/test_text_contract.py": 21,
    "pipelines/test_cli.py": 21,
    "pipelines/generate/test_generate_metrics.py": 21,
}


def pytest_collection_modifyitems(config, items):
    """Test files longest first (FILE_SECONDS; a file not listed counts 15 s), each file's own order kept."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.nodeid.split("::", 1)[0].removeprefix("tests/"), 15))


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
