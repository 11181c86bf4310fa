"""`subq cluster check [FILE...]`: an offline check of the cluster definitions, to run before `ray up` or
`kubectl apply`. Nothing here contacts a cloud or a Kubernetes API.

    subq cluster check                                  # the shipped files (below), from this checkout
    subq cluster check my_cluster.yaml README.md        # a launcher YAML, checked against the README's commands
    subq cluster check --crds ../kuberay/config/crd/bases cluster/kuberay/*.yaml   # also each manifest's CRD schema

FILEs, recognised by content: a Ray cluster-launcher YAML (`available_node_types`), KubeRay manifests (`kind:
RayCluster | RayJob | RayService`), a Dockerfile (`FROM ...`) and a Markdown file whose ```bash blocks hold `subq`
commands (the README). Default: ray_cluster.yaml, cluster/kuberay/*.yaml, Dockerfile and README.md of this checkout.

For a launcher YAML it runs Ray's own config code, the way `ray up` and the autoscaler do: `prepare_config` (Ray's
provider defaults, then global `setup_commands` merged into `head_setup_commands` / `worker_setup_commands`),
`validate_config` (Ray's schema), then the autoscaler's per-node-type lookup
(`StandardAutoscaler._get_node_type_specific_fields`: a type's own `worker_setup_commands`, `initialization_commands`
and `docker` replace the global ones). It prints, per node type or KubeRay group: image, resources, min-max workers,
the effective setup and start commands, and the IAM profile or service account. Then one `error:` line per problem:

- a node type whose effective commands install neither the project nor the pinned Ray (pyproject.toml);
- the AWS provider without `boto3` in the head's setup (the node provider runs there);
- a worker type without S3 access (an `IamInstanceProfile`; on Kubernetes a `serviceAccountName`) when the
  files use `s3://` URIs;
- a Python the commands assume (`python3.11 ...`) but the image lacks, or one below `requires-python`;
- Ray versions that disagree: image tags, `rayVersion`, `ray==` pins, pyproject.toml;
- resources the code requests that no node type or group can satisfy: teacher actors (`GenerateConfig`:
  0.25 CPU + 1 `generation`), Ray Train workers with `--use-gpu` (`ScalingConfig`), GPU decomposer replicas
  (`ServeConfig`), and `--num-workers N --use-gpu` in the README's commands or a RayJob's entrypoint beyond the
  GPUs the cluster can ever have.

Exit code 0 only when there is no problem (1 otherwise; 2 for a file that cannot be read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import typer
import yaml

from subq.errors import SubqError
from pipelines.cluster_files import Cluster, Command, LOCAL_PROVIDERS, Node, ROOT, _PY_CALL, _RAY_PIN, _is_project_image, _is_ray_image, _kuberay, _launcher, _min_python, crd_schema, gpu_workers, image_facts, project_pins, schema_problems, shell_commands

DEFAULT_FILES = ("ray_cluster.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob-train.yaml",
                 "cluster/kuberay/rayservice.yaml", "Dockerfile", "README.md")
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")


@dataclass
class Report:
    clusters: list[Cluster] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------------------------ the check


def code_requests() -> dict[str, dict[str, float]]:
    """What subq's code asks Ray for, from its own config classes (defaults)."""
    from ray.train import ScalingConfig

    from pipelines.generate_config import GenerateConfig
    from pipelines.serve import ServeConfig
    from training.config import TrainConfig

    g = GenerateConfig(input="gsm8k:test", output="/tmp/x")
    t = TrainConfig.model_fields["cpus_per_worker"].default
    train = ScalingConfig(num_workers=1, use_gpu=True, resources_per_worker={"CPU": t})._resources_per_worker_not_none
    s = ServeConfig()
    return {
        "teacher actor (GenerateConfig actor_num_cpus + actor_resources)": {"CPU": g.actor_num_cpus,
                                                                           **g.actor_resources},
        "Ray Train worker with --use-gpu (ScalingConfig)": {k: float(v) for k, v in train.items()},
        "GPU decomposer replica (ServeConfig decomposer_num_gpus: 1)": {"CPU": s.decomposer_num_cpus, "GPU": 1.0},
    }


def _fits(request: dict[str, float], offer: dict[str, float]) -> bool:
    return all(offer.get(k, 0) >= v for k, v in request.items() if v)


def _can_host(n: Node, request: dict[str, float]) -> bool:
    return (n.head or n.max_workers >= 1) and _fits(request, n.resources)


def _gpu_capacity(cl: Cluster, per_worker: dict[str, float]) -> tuple[int, str]:
    total, parts = 0, []
    for n in cl.nodes:
        if not _can_host(n, per_worker):
            continue
        per_node = int(min(n.resources.get(k, 0) // v for k, v in per_worker.items() if v))
        count = 1 if n.head else n.max_workers
        total += per_node * count
        parts.append(f"{n.name}: {count} x {per_node}")
    return total, ", ".join(parts) or "no node type has a GPU"


def _norm_home(path: str) -> str:
    return path.replace("$HOME/", "~/").rstrip("/")


def _installs(n: Node, pins: dict, facts: dict, mounts: Iterable[str] = ()) -> tuple[bool, bool, list[str],
                                                                                   list[str]]:
    """(installs the project, has the pinned Ray, kinds named by install_node.sh, what the commands use but no
    command or file mount provides). A command that runs pip/python from a venv no command creates, or works in
    the checkout (~/subq) that neither a file mount nor a `git clone` provides, installs nothing."""
    text = "\n".join(n.setup)
    created = {_norm_home(v) for v in re.findall(r"(?:-m\s+venv|virtualenv)\s+(?:-\S+\s+)*(\S+)", text)}
    checkouts = {_norm_home(m) for m in mounts} | {
        _norm_home(d) for d in re.findall(r"git\s+clone\s+(?:-\S+\s+)*\S+\s+(\S+)", text)}
    missing: list[str] = []
    usable = []
    for cmd in n.setup:
        venvs = {_norm_home(v) for v in re.findall(r"(\S+?)/bin/(?:pip3?|python3?)\b", cmd)}
        gone = [v for v in venvs if v not in created]
        trees = {_norm_home(t) for t in re.findall(r"(~/subq|\$HOME/subq)(?=/|\s|$)", cmd)}
        no_tree = [t for t in trees if t not in checkouts]
        missing += [f"the venv {v}" for v in gone] + [f"the checkout {t}" for t in no_tree]
        if not gone and not no_tree:
            usable.append(cmd)
    text = "\n".join(usable)
    kinds = re.findall(r"install_node\.sh\s+(cpu|gpu)\b", text)
    pip_project = re.search(r"pip3?\s+install\b[^\n]*?(?:\s-e\s+|\s)(?:\.|~/subq|\$HOME/subq|[^\s]*/subq)(?:\s|$)",
                            text)
    project = bool(kinds or pip_project)
    pinned = [m.group("v") for m in _RAY_PIN.finditer(text)]
    ray_ok = project or pins["ray"] in pinned or (_is_ray_image(facts) and facts.get("ray") == pins["ray"])
    return project, ray_ok, kinds, list(dict.fromkeys(missing))


def check_files(paths: Optional[list[str]] = None, *, root: Path = ROOT, crds: Optional[Path] = None) -> Report:
    """Read and check FILEs (default: the shipped ones under `root`). Never contacts a cloud."""
    if not paths and not (root / DEFAULT_FILES[0]).is_file() and (Path.cwd() / DEFAULT_FILES[0]).is_file():
        root = Path.cwd()  # an installed subq: the checkout is where the command runs
    pins = project_pins(root)
    rep = Report()
    files = [Path(p) for p in paths] if paths else [root / f for f in DEFAULT_FILES]
    commands: list[Command] = []
    docker_froms: list[tuple[str, str, str]] = []
    versions: list[tuple[str, str]] = []  # (where, Ray version)
    s3 = False
    for p in files:
        if not p.is_file():
            raise SubqError("no such file", source=str(p), hint="subq cluster check [FILE...]")
        shown = str(p.relative_to(root)) if p.is_absolute() and p.is_relative_to(root) else str(p)
        rep.files.append(shown)
        text = p.read_text()
        if p.suffix.lower() in (".md", ".markdown"):
            cmds = shell_commands(shown, text)
            commands += cmds
            s3 = s3 or any("s3://" in c.text for c in cmds)
            continue
        if p.name.startswith("Dockerfile") or p.suffix == ".Dockerfile":
            froms = re.findall(r"^\s*FROM\s+(\S+)", text, flags=re.M | re.I)
            args = dict(re.findall(r"^\s*ARG\s+(\w+)=(\S+)", text, flags=re.M))
            for f in froms:
                docker_froms.append((shown, re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), f),
                                     text))
            continue
        try:
            docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
        except yaml.YAMLError as e:
            raise SubqError(f"not YAML: {e}", source=shown) from None
        for d in docs:
            if d.get("kind") in KUBERAY_KINDS:
                cl, rv = _kuberay(shown, d)
                rep.clusters.append(cl)
                versions.append((f"{cl.label}: rayVersion", str(rv) if rv else "<missing>"))
                s3 = s3 or "s3://" in yaml.safe_dump(d)
                if crds is not None:
                    crd = Path(crds) / f"ray.io_{d['kind'].lower()}s.yaml"
                    rep.problems += schema_problems(d, crd_schema(crd), f"{shown} ({d['kind']})")
            elif "available_node_types" in d or "provider" in d:
                cl = _launcher(shown, d, rep.problems)
                if cl:
                    rep.clusters.append(cl)
    _check(rep, pins, commands, docker_froms, versions, s3)
    return rep


def _check(rep: Report, pins: dict, commands: list[Command], froms: list, versions: list, s3: bool) -> None:
    P = rep.problems
    ray_pin = pins["ray"]
    min_py = _min_python(pins["requires_python"])
    requests = code_requests()
    gen_request = next(v for k, v in requests.items() if k.startswith("teacher"))
    autoscaled = {k for k in gen_request if k not in ("CPU", "GPU", "memory")}

    for where, f, text in froms:
        facts = image_facts(f)
        if not _is_ray_image(facts):
            P.append(f"{where}: FROM {f}: not a rayproject/ray image (its Ray would not be the pinned {ray_pin})")
        elif facts.get("ray") != ray_pin:
            P.append(f"{where}: FROM {f}: Ray {facts.get('ray', '?')} in the image tag, pyproject.toml pins {ray_pin}")
        if min_py and facts.get("python") and facts["python"] < min_py:
            P.append(f"{where}: FROM {f}: Python {'.'.join(map(str, facts['python']))} is below requires-python "
                     f"{pins['requires_python']}")
        if "install_node.sh" not in text:
            P.append(f"{where}: never runs cluster/install_node.sh (the one way a node is built)")

    for where, v in versions:
        if v != ray_pin:
            P.append(f"{where} is {v}, pyproject.toml pins ray=={ray_pin}")

    for cl in rep.clusters:
        for n in cl.nodes:
            what = f"{cl.source}: {'head' if n.head else 'node type' if cl.kind == 'launcher' else 'group'} {n.name!r}"
            facts = image_facts(n.image)
            if n.image and facts.get("ray") and facts["ray"] != ray_pin:
                P.append(f"{what}: image {n.image} has Ray {facts['ray']}, pyproject.toml pins {ray_pin}")
            if n.image and facts.get("python"):
                have = facts["python"]
                for m in _PY_CALL.finditer("\n".join(n.setup + n.start)):
                    want = tuple(int(x) for x in m.group("v").split("."))
                    if want != have:
                        P.append(f"{what}: commands call python{m.group('v')} but image {n.image} has Python "
                                 f"{have[0]}.{have[1]}")
                        break
                if min_py and have < min_py:
                    P.append(f"{what}: image {n.image} has Python {have[0]}.{have[1]}, below requires-python "
                             f"{pins['requires_python']}")
            if cl.kind == "launcher" and cl.provider in LOCAL_PROVIDERS:
                pass  # its nodes are processes on this machine, with this machine's install
            elif cl.kind == "launcher":
                project, ray_ok, kinds, missing = _installs(n, pins, facts, cl.mounts)
                if missing:
                    P.append(f"{what}: its effective setup commands use {', '.join(missing)}, which none of them "
                             f"creates (a type's own worker_setup_commands replace the global setup_commands)")
                for m in _RAY_PIN.finditer("\n".join(n.setup)):
                    if m.group("v") != ray_pin:
                        P.append(f"{what}: its setup pins ray=={m.group('v')}, pyproject.toml pins {ray_pin}")
                if not project:
                    P.append(f"{what}: its effective setup commands do not install the project "
                             f"(bash ~/subq/cluster/install_node.sh cpu|gpu); a type's own worker_setup_commands "
                             f"replace the global setup_commands")
                if not ray_ok:
                    P.append(f"{what}: nothing installs Ray {ray_pin}: not the image, not its setup commands")
                if n.resources.get("GPU") and kinds and "gpu" not in kinds:
                    P.append(f"{what}: a GPU node type that installs the CPU build of torch (install_node.sh cpu)")
                if n.head and cl.provider == "aws" and "boto3" not in "\n".join(n.setup):
                    P.append(f"{what}: its setup commands do not install boto3, which the AWS node provider needs "
                             f"on the head (Ray's default head_setup_commands install it; this file's replace them)")
                if s3 and cl.provider == "aws" and not n.head and not n.access:
                    P.append(f"{what}: no IamInstanceProfile, so its Ray workers cannot read or write the s3:// "
                             f"URIs in use (the launcher gives its profile to the head only)")
            else:
                if not _is_project_image(facts):
                    P.append(f"{what}: image {n.image} is not the project image built from ./Dockerfile "
                             f"(subq:{ray_pin}-pyXY-cpu|gpu), so the project is not installed there")
                if s3 and not n.access and not ({"AWS_ACCESS_KEY_ID", "AWS_ROLE_ARN"} & set(n.env)):
                    P.append(f"{what}: no serviceAccountName (an IAM role with S3 access) and no AWS credentials, "
                             f"so it cannot read or write the s3:// URIs in use")
            if autoscaled and any(_fits(gen_request, m.resources) for m in cl.nodes if not m.head) and \
                    cl.kind == "launcher" and "ray start" in " ".join(n.start):
                have = set(n.env.get("SUBQ_AUTOSCALED_RESOURCES", "").split(","))
                if not autoscaled <= have:
                    P.append(f"{what}: `ray start` does not export SUBQ_AUTOSCALED_RESOURCES={','.join(autoscaled)}, "
                             f"so job drivers drop the teacher actors' request before the first such node is up")

        # Resources the code requests, per kind of cluster.
        wanted: dict[str, dict[str, float]] = {}
        is_job = cl.entrypoint is not None
        if cl.kind == "launcher" and cl.provider in LOCAL_PROVIDERS:
            wanted = {k: v for k, v in requests.items() if k.startswith("teacher")}  # a CPU-only dev cluster
        elif cl.kind == "launcher" or (cl.kind == "kuberay" and not is_job and not cl.serve_args):
            wanted = dict(requests)
        if is_job and gpu_workers(cl.entrypoint) is not None:
            wanted = {k: v for k, v in requests.items() if k.startswith("Ray Train")}
        for args in cl.serve_args:
            from pipelines.serve import ServeConfig  # parsed as pipelines.serve.app_builder parses its args
            from subq.config import load_config

            nested: dict[str, Any] = {}
            for k, v in dict(args).items():
                if "." in k:
                    outer, inner = k.split(".", 1)
                    nested.setdefault(outer, {})[inner] = v
                else:
                    nested[k] = v
            try:
                sc = load_config(ServeConfig, None, nested)
            except Exception as e:  # noqa: BLE001 - the Serve app's own validation
                P.append(f"{cl.label}: serveConfigV2 args rejected by ServeConfig: {e}")
                continue
            wanted[f"decomposer replica (serveConfigV2: decomposer_num_gpus {sc.decomposer_num_gpus:g})"] = {
                "CPU": sc.decomposer_num_cpus, "GPU": sc.decomposer_num_gpus}
        for label, req in wanted.items():
            if not any(_can_host(n, req) for n in cl.nodes):
                P.append(f"{cl.label}: no node type or group can host a {label}: it requests "
                         f"{_fmt(req)}; offered: " + "; ".join(f"{n.name} {_fmt(n.resources)}" for n in cl.nodes))

        # --num-workers N --use-gpu: the README's commands (launcher) or the RayJob's entrypoint (its own cluster).
        train_req = next(v for k, v in requests.items() if k.startswith("Ray Train"))
        checked = [Command(cl.source, 0, cl.entrypoint)] if is_job else (commands if cl.kind == "launcher" else [])
        for c in checked:
            n_workers = gpu_workers(c.text)
            if n_workers is None:
                continue
            cap, how = _gpu_capacity(cl, train_req)
            if n_workers > cap:
                where = f"{c.source}:{c.line}" if c.line else c.source
                P.append(f"{where}: `--num-workers {n_workers} --use-gpu` needs {n_workers} GPU workers; "
                         f"{cl.label} can have at most {cap} ({how})")


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items()) + "}"


def render(rep: Report) -> str:
    """The per-node table, then the problems."""
    lines = []
    for cl in rep.clusters:
        lines.append(cl.label)
        for n in cl.nodes:
            span = "head" if n.head else f"{n.min_workers}-{n.max_workers} workers"
            lines.append(f"  {n.name:<18} {span:<14} image {n.image or '(host, no docker)'}")
            lines.append(f"  {'':<18} resources {_fmt(n.resources)}  "
                         f"{'IAM profile' if cl.kind == 'launcher' else 'service account'} {n.access or '-'}")
            if cl.kind == "launcher" and cl.provider in LOCAL_PROVIDERS:
                lines.append(f"  {'':<18} setup: - (provider {cl.provider}: nodes are processes on this machine)")
            elif cl.kind == "launcher":
                lines.append(f"  {'':<18} setup: " + (" ; ".join(n.setup) or "-"))
            lines.append(f"  {'':<18} start: " + (" ; ".join(" ".join(s.split()) for s in n.start) or "-"))
        if cl.entrypoint:
            lines.append(f"  entrypoint: {' '.join(cl.entrypoint.split())}")
    for p in rep.problems:
        lines.append(f"error: {p}")
    lines.append(f"{'ok' if rep.ok else 'FAILED'}: {len(rep.files)} file(s), {len(rep.problems)} problem(s)")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """`subq cluster check` (the front door, pipelines/cli.py, calls this)."""
    cluster_app = typer.Typer(help="Cluster definitions: check them offline before `ray up` / `kubectl apply`.",
                              no_args_is_help=True)

    @cluster_app.command("check")
    def check(files: Optional[list[str]] = typer.Argument(None, help="Launcher YAML, KubeRay manifests, Dockerfile, "
                                                          "README (default: the shipped ones of this checkout)."),
              crds: Optional[str] = typer.Option(None, "--crds", help="Folder with KubeRay's CRD files "
                                                 "(ray.io_rayclusters.yaml, ...): also validate each manifest's "
                                                 "spec against its schema and reject unknown keys.")) -> None:
        """Offline check of cluster definitions, with Ray's own config code: per node type the image,
        resources, min-max workers, effective setup/start commands and IAM profile; then one `error:` line per
        problem (see pipelines/cluster_check.py). Exit code 1 when there is one."""

        rep = check_files(files or None, crds=Path(crds) if crds else None)
        print(render(rep))
        if not rep.ok:
            raise typer.Exit(1)

    app.add_typer(cluster_app, name="cluster")
