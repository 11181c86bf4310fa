"""Submit subq's entry points to a Ray cluster over the Jobs API, the teacher key travelling out of sight.

    export RAY_ADDRESS=http://HEAD:8265 OPENAI_API_KEY=sk-...          # token: see cluster/auth.py
    subq submit generate --input gsm8k:train --output s3://bucket/gsm8k-ai-subq --actors 2,16 --rpm 3500
    subq submit train --config train.yaml --wait
    subq submit eval  --config eval.yaml
    subq submit serve --config pipelines/serve_config.yaml
    # what subq runs on the cluster (the same by hand, with the key already in the nodes' environment):
    ray job submit --working-dir . -- python -m pipelines.generate --input gsm8k:train --output ...

Packaging: the project directory is the job's `runtime_env.working_dir` (Ray zips and uploads it), with
`EXCLUDES` (data, checkpoints, outputs, caches, .git) left out; the entrypoint is
`python -m cluster.submit <module> <args...>` run inside that directory.

`--runtime-env FILE|JSON` (as `ray job submit --runtime-env` / `--runtime-env-json`) is merged into that
runtime_env: env_vars, pip, image_uri, ... as given; py_modules and excludes appended; `working_dir` is ours
(--working-dir); env_vars naming or holding the key are refused. `--entrypoint-num-cpus/-gpus/-resources`
reserve resources for the driver (the job waits until a node has them).

The teacher key (the variable named by `--key-env`, default OPENAI_API_KEY): `runtime_env.env_vars`, the
entrypoint and metadata are all shown verbatim by `ray job list` / `get_job_info`, so the key goes in none of
them. subq writes it to a private one-file package (`subq_job_secret/key`, mode 0600, plus a per-submission
nonce so its content hash, hence its `gcs://` URI, is never shared with another job) and ships that as a
`runtime_env.py_modules` package; the local copy is deleted once submitted. On the cluster, `python -m
cluster.submit` (the job's driver) reads it once into the environment variable of the same name
(`load_secret`), then, for generate and train, destroys it before the module runs: the unpacked files on its
node, the package in the GCS (the only copy a token holder could fetch), and its entry in the job's runtime_env
(the driver's RAY_JOB_CONFIG_JSON_ENV_VAR), so no worker of the job ever unpacks it on any node. Teacher actors
get the key from the driver through the object store (an ObjectRef only the job holds). What remains:
- between submission and the driver's start (longer while the job waits for entrypoint resources), a token
  holder who lists the GCS packages can read it, as they could read anything the job ships;
- eval and serve keep the package for the job's life: their Solver replicas read it on their own nodes;
- the key lives in the driver's and the teacher actors' memory while the job runs.
If `--key-env` is not set locally nothing is shipped and the job uses whatever the cluster nodes' own
environment holds (`ray start` inherits the shell's environment).
"""

from __future__ import annotations

import os
import runpy
import shlex
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Optional

from subq.errors import SubqError

TARGETS = {  # subq submit <name> -> module run on the cluster
    "generate": "pipelines.generate",
    "train": "training.train",
    "eval": "pipelines.evaluate",
    "serve": "pipelines.serve",
}
EXCLUDES = [  # gitignore-style patterns, relative to the working_dir
    ".git", "**/__pycache__", "*.pyc", ".pytest_cache", "*.egg-info", ".venv", "/build", "/dist",
    "/data", "/outputs", "/runs", "/checkpoints", "**/checkpoints", "/subq-demo", "/benchmarks/results",
    "*.safetensors", "*.pt", "*.bin", "*.ckpt", "*.tmp", "ray_results",
]
SECRET_PKG = "subq_job_secret"
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # how the Jobs API hands a driver its job's runtime_env
# targets whose workers never read the key file (teacher actors get it through the object store): the driver
# destroys the package as soon as it has read it. eval/serve Solver replicas still read it on their own nodes.
STRIP_FOR = ("generate", "train")


def project_root() -> Path:
    """The subq checkout this module belongs to (the default working_dir)."""
    return Path(__file__).resolve().parents[1]


def _secret_package(key_env: str, value: str, nonce: str = "", strip: bool = True) -> str:
    """A private one-file package holding the key (mode 0600), unique per submission (`nonce`: its content
    hash, hence its gcs:// URI, differs even for the same key), to ship as a runtime_env py_module."""
    d = Path(tempfile.mkdtemp(prefix="subq-secret-"))
    pkg = d / SECRET_PKG
    pkg.mkdir(mode=0o700)
    (pkg / "__init__.py").write_text('"""Job-scoped secret shipped by `subq submit` (see cluster/submit.py)."""\n')
    (pkg / "job").write_text(f"{nonce or uuid.uuid4().hex}\n{'strip' if strip else 'keep'}\n")
    f = pkg / "key"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{key_env}\n{value}")
    return str(pkg)


def _forget_package(pkg_root: Path) -> None:
    """Destroy every trace of the unpacked secret package `pkg_root` (runtime_resources/.../_ray_pkg_<hash>):
    the files on this node, the package in the GCS, and its entry in this job's runtime_env (so no worker of the
    job ever unpacks it on another node) and PYTHONPATH."""
    import json

    uri = f"gcs://{pkg_root.name}.zip"  # the py_modules dir is named after its package
    cfg_json = os.environ.get(JOB_CONFIG_ENV)
    if cfg_json:
        cfg = json.loads(cfg_json)
        renv = cfg.get("runtime_env") or {}
        mods = [m for m in renv.get("py_modules") or [] if m != uri and Path(str(m)).name != pkg_root.name]
        if mods:
            renv["py_modules"] = mods
        else:
            renv.pop("py_modules", None)
        os.environ[JOB_CONFIG_ENV] = json.dumps(cfg)
    if os.environ.get("PYTHONPATH"):
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in os.environ["PYTHONPATH"].split(os.pathsep) if Path(p).name != pkg_root.name)
    sys.path[:] = [p for p in sys.path if Path(p).name != pkg_root.name]
    shutil.rmtree(pkg_root, ignore_errors=True)
    Path(str(pkg_root) + ".zip").unlink(missing_ok=True)
    gcs_address = os.environ.get("RAY_ADDRESS")
    if gcs_address and "://" not in gcs_address:
        try:
            from ray._raylet import GcsClient

            GcsClient(address=gcs_address).internal_kv_del(uri.encode(), False, None)
        except Exception as e:  # noqa: BLE001 - never fail the job over it; say so (no secret in the message)
            print(f"subq: could not delete the key package from the GCS ({type(e).__name__})", file=sys.stderr)


def load_runtime_env(spec: Optional[str]) -> dict:
    """`--runtime-env`: inline JSON (starts with `{`) or a YAML/JSON file, as `ray job submit --runtime-env`."""
    if not spec:
        return {}
    import json

    import yaml

    text, what = spec, "--runtime-env JSON"
    if not spec.lstrip().startswith("{"):
        p = Path(spec).expanduser()
        if not p.is_file():
            raise SubqError(f"--runtime-env {spec}: no such file (give a YAML/JSON file or inline JSON)",
                            field="--runtime-env")
        text, what = p.read_text(), f"--runtime-env {p}"
    try:
        env = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise SubqError(f"{what} is not valid JSON/YAML: {str(e).splitlines()[0]}", field="--runtime-env") from None
    if not isinstance(env, dict):
        raise SubqError(f"{what} must be a mapping (runtime_env fields: env_vars, pip, image_uri, ...)",
                        field="--runtime-env")
    return env


def build_runtime_env(working_dir: Optional[str] = None, extra_excludes: Optional[list] = None,
                      secret_module: Optional[str] = None, pip: Optional[list] = None,
                      user: Optional[dict] = None, key_env: Optional[str] = None,
                      key_value: Optional[str] = None) -> dict:
    """The job's runtime_env: the project as working_dir (minus EXCLUDES), the user's `--runtime-env` merged in
    (env_vars, pip, image_uri/container, ...; extra py_modules and excludes are appended), plus the secret
    package if any. The key never goes in: a user env_var named `key_env` or holding the key is refused."""
    wd = Path(working_dir or project_root()).resolve()
    if not (wd / "subq").is_dir():
        raise SubqError(f"{wd} is not a subq checkout (no subq/ package)", field="--working-dir")
    env: dict = {"working_dir": str(wd), "excludes": EXCLUDES + list(extra_excludes or [])}
    user = dict(user or {})
    if "working_dir" in user:
        raise SubqError("--runtime-env sets working_dir; subq packages the project itself (use --working-dir)",
                        field="--runtime-env")
    ev = user.get("env_vars") or {}
    if not isinstance(ev, dict):
        raise SubqError("--runtime-env env_vars must be a mapping NAME: value", field="--runtime-env")
    if key_env and key_env in ev or key_value and any(key_value in str(v) for v in ev.values()):
        raise SubqError(f"--runtime-env env_vars would carry the teacher key (${key_env}); env_vars are shown "
                        "in job info: subq ships the key itself", field="--runtime-env")
    env["excludes"] += list(user.pop("excludes", None) or [])
    py_modules = list(user.pop("py_modules", None) or [])
    env.update(user)
    if secret_module:
        py_modules.append(secret_module)
    if py_modules:
        env["py_modules"] = py_modules
    if pip:
        env["pip"] = list(pip)
    return env


def _parse_resources(spec: Optional[str]) -> Optional[dict]:
    if not spec:
        return None
    import json

    try:
        res = json.loads(spec)
    except ValueError:
        res = None
    if not isinstance(res, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in res.values()):
        raise SubqError(f"--entrypoint-resources {spec!r} must be a JSON object of name: amount, e.g. "
                        '\'{"generation": 1}\'', field="--entrypoint-resources")
    return res


def submit(target: str, args: list[str], *, address: Optional[str] = None, key_env: str = "OPENAI_API_KEY",
           working_dir: Optional[str] = None, excludes: Optional[list] = None, job_id: Optional[str] = None,
           metadata: Optional[dict] = None, entrypoint_num_cpus: Optional[float] = None,
           entrypoint_num_gpus: Optional[float] = None, entrypoint_resources: Optional[str | dict] = None,
           runtime_env: Optional[str | dict] = None) -> str:
    """Submit `subq <target> ARGS` as a Ray job; returns the submission id. The key in $key_env (if set)
    travels as a one-use py_modules package (see the module docstring), never in the entrypoint, env_vars or
    metadata. `runtime_env`: a dict, inline JSON or a YAML/JSON file, merged with ours."""
    from cluster.jobs import Jobs

    if target not in TARGETS:
        raise SubqError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}", field="TARGET")
    value = os.environ.get(key_env) if key_env else None
    if value and any(value in a for a in args):
        raise SubqError(f"the value of ${key_env} appears in the job arguments; pass it only through the "
                        "environment", field="ARGS")
    user_env = runtime_env if isinstance(runtime_env, dict) else load_runtime_env(runtime_env)
    resources = (entrypoint_resources if isinstance(entrypoint_resources, dict)
                 else _parse_resources(entrypoint_resources))
    for name, v in (("--entrypoint-num-cpus", entrypoint_num_cpus), ("--entrypoint-num-gpus", entrypoint_num_gpus)):
        if v is not None and v < 0:
            raise SubqError(f"{name} must be >= 0, got {v}", field=name)
    build_runtime_env(working_dir, excludes, None, user=user_env, key_env=key_env, key_value=value)  # checks first
    jobs = Jobs(address)
    sid = job_id or f"subq-{target}-{uuid.uuid4().hex[:10]}"
    secret = _secret_package(key_env, value, nonce=sid, strip=target in STRIP_FOR) if value else None
    try:
        renv = build_runtime_env(working_dir, excludes, secret, user=user_env, key_env=key_env, key_value=value)
        base = Path(renv["working_dir"], *TARGETS[target].split("."))
        # what `python -m` runs: a package's __main__.py (every job today) or a module file
        if not ((base / "__main__.py").is_file() or base.with_suffix(".py").is_file()):
            raise SubqError(f"{TARGETS[target]} is not in {renv['working_dir']} (no {base.name}/__main__.py)",
                            field="TARGET", hint="update the checkout that is packaged (--working-dir)")
        entrypoint = " ".join(["python", "-m", "cluster.submit", TARGETS[target], *map(shlex.quote, args)])
        kw = {}
        if entrypoint_num_cpus is not None:
            kw["entrypoint_num_cpus"] = entrypoint_num_cpus
        if entrypoint_num_gpus is not None:
            kw["entrypoint_num_gpus"] = entrypoint_num_gpus
        if resources:
            kw["entrypoint_resources"] = resources
        return jobs.call("submit_job", entrypoint=entrypoint, runtime_env=renv, submission_id=sid,
                         metadata={"subq_target": target, **(metadata or {})}, **kw)
    finally:
        if secret:
            shutil.rmtree(Path(secret).parent, ignore_errors=True)


def share_key(env: str) -> Optional[list]:
    """Driver side of the key's trip to Ray workers that lack this shell's environment (a cluster joined through
    RAY_ADDRESS): [ObjectRef] of the value of the variable named `env`, or None when it is not set. The key travels
    in the object store, never in task specs, runtime_env or logs; workers read it with `worker_key`."""
    value = os.environ.get(env)
    if not value:
        return None
    import ray

    return [ray.put(value)]


def worker_key(env: str, ref: Optional[list]) -> Optional[str]:
    """Worker side: the variable named `env` when this worker has it, else the value `share_key` sent, else None."""
    value = os.environ.get(env)
    if value or not ref:
        return value or None
    import ray

    return ray.get(ref[0])


def load_secret() -> Optional[str]:
    """On the cluster: move the shipped key (if any) into its environment variable, read once; returns the
    variable name. For targets whose workers never need the file (generate, train: teacher actors receive the key
    through the object store), the first reader (the job's driver) then destroys the package: its files, its GCS
    copy, and its place in the job's runtime_env (`_forget_package`)."""
    import importlib

    try:
        mod = importlib.import_module(SECRET_PKG)
    except ImportError:
        return None
    pkg = Path(mod.__file__).parent
    f = pkg / "key"
    if not f.is_file():
        return None
    name, _, value = f.read_text().partition("\n")
    job = (pkg / "job").read_text().split() if (pkg / "job").is_file() else []
    if name and value and not os.environ.get(name):
        os.environ[name] = value
    if "strip" in job:
        _forget_package(pkg.parent)
        sys.modules.pop(SECRET_PKG, None)
    return name


def main(argv: Optional[list[str]] = None) -> None:
    """Job-side launcher: `python -m cluster.submit <module> [args...]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m cluster.submit <module> [args...]", file=sys.stderr)
        raise SystemExit(2)
    load_secret()
    module = argv[0]
    sys.argv = [module, *argv[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
