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

The teacher key (the variable named by `--key-env`, default OPENAI_API_KEY): `runtime_env.env_vars` and the
entrypoint are both shown verbatim by `ray job list` / `get_job_info`, so the key goes in neither. subq writes
it to a private one-file package (`subq_job_secret/key`, mode 0600) in a local temporary directory, ships
that as a `runtime_env.py_modules` package (job info shows only its content-hash `gcs://` URI) and deletes
the local copy once submitted. On the cluster, `python -m cluster.submit` reads it into the environment
variable of the same name, then runs the module in-process (`runpy`), so the key is never on a command line.
Anyone holding the cluster's token can read uploaded packages, exactly as they can run code there: the
token is the security boundary. If `--key-env` is not set locally nothing is shipped and the job uses
whatever the cluster nodes' own environment holds (`ray start` inherits the shell's environment).
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


def project_root() -> Path:
    """The subq checkout this module belongs to (the default working_dir)."""
    return Path(__file__).resolve().parents[1]


def _secret_package(key_env: str, value: str) -> str:
    d = Path(tempfile.mkdtemp(prefix="subq-secret-"))
    pkg = d / SECRET_PKG
    pkg.mkdir(mode=0o700)
    (pkg / "__init__.py").write_text('"""Job-scoped secret shipped by `subq submit` (see cluster/submit.py)."""\n')
    f = pkg / "key"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{key_env}\n{value}")
    return str(pkg)


def build_runtime_env(working_dir: Optional[str] = None, extra_excludes: Optional[list] = None,
                      secret_module: Optional[str] = None, pip: Optional[list] = None) -> dict:
    """The job's runtime_env: the project as working_dir (minus EXCLUDES), plus the secret package if any."""
    wd = Path(working_dir or project_root()).resolve()
    if not (wd / "subq").is_dir():
        raise SubqError(f"{wd} is not a subq checkout (no subq/ package)", field="--working-dir")
    env: dict = {"working_dir": str(wd), "excludes": EXCLUDES + list(extra_excludes or [])}
    if secret_module:
        env["py_modules"] = [secret_module]
    if pip:
        env["pip"] = list(pip)
    return env


def submit(target: str, args: list[str], *, address: Optional[str] = None, key_env: str = "OPENAI_API_KEY",
           working_dir: Optional[str] = None, excludes: Optional[list] = None, job_id: Optional[str] = None,
           metadata: Optional[dict] = None, entrypoint_num_cpus: Optional[float] = None) -> str:
    """Submit `subq <target> ARGS` as a Ray job; returns the submission id. The key in $key_env (if set)
    travels as a py_modules package, never in the entrypoint, env_vars or metadata."""
    from cluster.jobs import Jobs

    if target not in TARGETS:
        raise SubqError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}", field="TARGET")
    value = os.environ.get(key_env) if key_env else None
    if value and any(value in a for a in args):
        raise SubqError(f"the value of ${key_env} appears in the job arguments; pass it only through the "
                        "environment", field="ARGS")
    jobs = Jobs(address)
    secret = _secret_package(key_env, value) if value else None
    try:
        runtime_env = build_runtime_env(working_dir, excludes, secret)
        mod_file = Path(runtime_env["working_dir"], *TARGETS[target].split(".")).with_suffix(".py")
        if not mod_file.is_file():
            raise SubqError(f"{TARGETS[target]} is not in {runtime_env['working_dir']} (no {mod_file.name})",
                            field="TARGET", hint="update the checkout that is packaged (--working-dir)")
        entrypoint = " ".join(["python", "-m", "cluster.submit", TARGETS[target], *map(shlex.quote, args)])
        kw = {}
        if entrypoint_num_cpus is not None:
            kw["entrypoint_num_cpus"] = entrypoint_num_cpus
        return jobs.call("submit_job", entrypoint=entrypoint, runtime_env=runtime_env,
                         submission_id=job_id or f"subq-{target}-{uuid.uuid4().hex[:10]}",
                         metadata={"subq_target": target, **(metadata or {})}, **kw)
    finally:
        if secret:
            shutil.rmtree(Path(secret).parent, ignore_errors=True)


def load_secret() -> Optional[str]:
    """On the cluster: move the shipped key (if any) into its environment variable; returns the variable name."""
    try:
        import importlib

        mod = importlib.import_module(SECRET_PKG)
    except ImportError:
        return None
    f = Path(mod.__file__).parent / "key"
    if not f.is_file():
        return None
    name, _, value = f.read_text().partition("\n")
    if name and value and not os.environ.get(name):
        os.environ[name] = value
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
