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

import copy
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import typer
import yaml

from subq.errors import SubqError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILES = ("ray_cluster.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob-train.yaml",
                 "cluster/kuberay/rayservice.yaml", "Dockerfile", "README.md")
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
# providers whose "nodes" are processes on this machine: no node updater runs setup commands there
LOCAL_PROVIDERS = ("fake_multinode", "fake_multinode_docker")
_IMAGE_TAG = re.compile(r"^(?P<version>\d+\.\d+\.\d+)(?:-py(?P<py>\d)(?P<pyminor>\d+))?(?:-(?P<platform>[A-Za-z0-9.]+))?")
_PY_CALL = re.compile(r"(?<![\w.-])python(?P<v>3\.\d+)\b")
_RAY_PIN = re.compile(r"""\bray(?:\[[^\]]*\])?==(?P<v>[0-9][\w.]*)""")


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Node:
    """One launcher node type or KubeRay group, as it will run."""

    name: str
    head: bool
    image: Optional[str]
    resources: dict[str, float]
    min_workers: int
    max_workers: int
    setup: list[str] = field(default_factory=list)
    start: list[str] = field(default_factory=list)
    access: Optional[str] = None  # IamInstanceProfile (launcher) or serviceAccountName (KubeRay)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Cluster:
    source: str
    label: str
    kind: str  # launcher | kuberay
    provider: str
    nodes: list[Node]
    entrypoint: Optional[str] = None  # RayJob
    mounts: list[str] = field(default_factory=list)  # launcher file_mounts targets
    serve_args: list[dict] = field(default_factory=list)  # RayService applications running pipelines.serve


@dataclass
class Report:
    clusters: list[Cluster] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------------------------ pins


def project_pins(root: Path = ROOT) -> dict[str, str]:
    """Ray pin, torch pin and requires-python from pyproject.toml (else the installed subq's metadata)."""
    text = ""
    pp = root / "pyproject.toml"
    if pp.is_file():
        text = pp.read_text()
    else:  # an installed (non-editable) subq: its metadata carries the same pins
        import importlib.metadata as md

        try:
            text = "\n".join(md.requires("subq") or []) + f"\nrequires-python = \"{md.metadata('subq')['Requires-Python']}\""
        except md.PackageNotFoundError:
            pass
    ray_pin = _RAY_PIN.search(text)
    torch_pin = re.search(r"\btorch==(?P<v>[0-9][\w.]*)", text)
    py = re.search(r"""requires-python\s*=\s*["'](?P<v>[^"']+)["']""", text)
    if not ray_pin:
        raise SubqError("no ray==X pin found in pyproject.toml", source=str(pp))
    return {"ray": ray_pin.group("v"), "torch": torch_pin.group("v") if torch_pin else "",
            "requires_python": py.group("v") if py else ""}


def _min_python(spec: str) -> Optional[tuple[int, int]]:
    m = re.search(r">=\s*(\d+)\.(\d+)", spec or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def image_facts(image: Optional[str]) -> dict[str, Any]:
    """What an image reference says about itself: repository, Ray version, Python (from tags like
    `2.60.0-py310-gpu`, the rayproject/ray convention our Dockerfile's tags follow)."""
    if not image:
        return {}
    ref = image.split("@", 1)[0]
    repo, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
    facts: dict[str, Any] = {"repo": repo, "tag": tag, "name": repo.rsplit("/", 1)[-1]}
    m = _IMAGE_TAG.match(tag)
    if m:
        facts["ray"] = m.group("version")
        if m.group("py"):
            facts["python"] = (int(m.group("py")), int(m.group("pyminor")))
        facts["platform"] = m.group("platform") or "cpu"
    return facts


def _is_ray_image(f: dict) -> bool:
    return f.get("repo", "").endswith("rayproject/ray") or f.get("repo") == "rayproject/ray"


def _is_project_image(f: dict) -> bool:
    return f.get("name") == "subq"


# ------------------------------------------------------------------------------------------------ launcher


class _TypeTags:
    """A node provider's node_tags, for the autoscaler's per-node-type lookup of one node type."""

    def __init__(self, node_type: str):
        from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

        self.tags = {TAG_RAY_USER_NODE_TYPE: node_type}

    def node_tags(self, node_id: str) -> dict:
        return self.tags


def effective_launcher_nodes(cfg: dict) -> tuple[dict, list[Node]]:
    """Ray's prepared config and, per node type, what the launcher runs there (see the module docstring)."""
    from types import SimpleNamespace

    from ray.autoscaler._private.autoscaler import StandardAutoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    import logging

    quiet = logging.getLogger("ray.autoscaler._private.util")  # "setting max workers for ..." info lines
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        if (cfg.get("provider") or {}).get("type") in LOCAL_PROVIDERS:
            # `ray start --head --autoscaling-config=FILE` reads such a file as already prepared (Ray's wheel has
            # no defaults file for these providers, so `ray up`'s prepare_config cannot run on them)
            from ray.autoscaler._private.util import fill_node_type_min_max_workers

            prepared = copy.deepcopy(cfg)
            fill_node_type_min_max_workers(prepared)
        else:
            prepared = prepare_config(copy.deepcopy(cfg))
        validate_config(prepared)
    finally:
        quiet.setLevel(level)
    nodes = []
    head_type = prepared["head_node_type"]
    for name, t in prepared["available_node_types"].items():
        nc = t.get("node_config", {}) or {}
        profile = nc.get("IamInstanceProfile")
        access = (profile.get("Name") or profile.get("Arn")) if isinstance(profile, dict) else profile
        if name == head_type:
            docker = prepared.get("docker") or {}  # the head uses the global docker section only (ray up)
            image = docker.get("head_image", docker.get("image")) if docker.get("container_name") else None
            nodes.append(Node(name, True, image, dict(t.get("resources", {})), 0, 0,
                              list(prepared["initialization_commands"]) + list(prepared["head_setup_commands"]),
                              list(prepared["head_start_ray_commands"]),
                              access or ("ray-autoscaler-v1 (ray up's default)" if prepared["provider"]["type"]
                                         == "aws" else None)))
            continue
        shim = SimpleNamespace(config=prepared, available_node_types=prepared["available_node_types"],
                               provider=_TypeTags(name))
        shim._get_node_type_specific_fields = (  # what _get_node_specific_docker_config calls on self
            lambda nid, key, s=shim: StandardAutoscaler._get_node_type_specific_fields(s, nid, key))
        docker = StandardAutoscaler._get_node_specific_docker_config(shim, name)
        image = docker.get("worker_image", docker.get("image")) if docker.get("container_name") else None
        init = StandardAutoscaler._get_node_type_specific_fields(shim, name, "initialization_commands")
        setup = StandardAutoscaler._get_node_type_specific_fields(shim, name, "worker_setup_commands")
        nodes.append(Node(name, False, image, dict(t.get("resources", {})), int(t.get("min_workers", 0)),
                          int(t.get("max_workers", 0)), list(init) + list(setup),
                          list(prepared["worker_start_ray_commands"]), access))
    return prepared, nodes


def _start_env(commands: Iterable[str]) -> dict[str, str]:
    """NAME=value words before `ray start` in start commands."""
    env: dict[str, str] = {}
    for c in commands:
        if "ray start" not in c:
            continue
        for w in c.split("ray start")[0].replace("&&", " ").replace(";", " ").split():
            if "=" in w and not w.startswith("-") and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w):
                k, v = w.split("=", 1)
                env[k] = v
    return env


def _launcher(path: str, cfg: dict, problems: list[str]) -> Optional[Cluster]:
    try:
        prepared, nodes = effective_launcher_nodes(cfg)
    except Exception as e:  # noqa: BLE001 - Ray's own validation: report its message
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        problems.append(f"{path}: Ray's prepare_config/validate_config rejects it: {type(e).__name__}: {msg}")
        return None
    for n in nodes:
        n.env = _start_env(n.start)
    return Cluster(path, f"{path} (Ray cluster launcher, provider {prepared['provider']['type']})", "launcher",
                   prepared["provider"]["type"], nodes, mounts=list(prepared.get("file_mounts") or {}))


# ------------------------------------------------------------------------------------------------ KubeRay


def _quantity(v: Any) -> float:
    """A Kubernetes quantity as a number (cpu "500m" -> 0.5, "8" -> 8)."""
    s = str(v).strip()
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    try:
        return float(s)
    except ValueError:
        return 0.0


def _ray_start_resources(params: dict, container: dict) -> dict[str, float]:
    """What `ray start` advertises in a KubeRay pod: rayStartParams first, else the container's limits (KubeRay's
    rule for num-cpus / num-gpus)."""
    limits = ((container or {}).get("resources") or {}).get("limits") or {}
    res: dict[str, float] = {}
    res["CPU"] = _quantity(params["num-cpus"]) if "num-cpus" in params else _quantity(limits.get("cpu", 0))
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu"))
    if gpus is not None and _quantity(gpus):
        res["GPU"] = _quantity(gpus)
    if params.get("resources"):
        raw = str(params["resources"]).strip()
        if raw.startswith('"') and raw.endswith('"'):
            raw = raw[1:-1].replace('\\"', '"')
        try:
            res.update({k: float(v) for k, v in json.loads(raw).items()})
        except (ValueError, AttributeError):
            res["<unreadable rayStartParams.resources>"] = 0.0
    return res


def _group_node(name: str, spec: dict, head: bool) -> Node:
    pod = ((spec.get("template") or {}).get("spec")) or {}
    containers = pod.get("containers") or [{}]
    c = containers[0]
    env = {e.get("name"): str(e.get("value", "<from " + next(iter(e.get("valueFrom", {"?": 0}))) + ">"))
           for e in c.get("env") or [] if isinstance(e, dict)}
    lo = 1 if head else int(spec.get("minReplicas", 0))
    hi = 1 if head else int(spec.get("maxReplicas", 0)) * int(spec.get("numOfHosts", 1) or 1)
    setup = [f"{k}={v}" for k, v in sorted((spec.get("rayStartParams") or {}).items())]
    return Node(name, head, c.get("image"), _ray_start_resources(spec.get("rayStartParams") or {}, c), lo, hi,
                [], ["ray start (KubeRay) " + " ".join("--" + s for s in setup)], pod.get("serviceAccountName"),
                env)


def _kuberay(path: str, doc: dict) -> tuple[Cluster, Optional[str]]:
    """A manifest's cluster (RayCluster spec, RayJob rayClusterSpec, RayService rayClusterConfig) and its
    rayVersion."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    name = (doc.get("metadata") or {}).get("name") or (doc.get("metadata") or {}).get("generateName") or "?"
    cspec = spec if kind == "RayCluster" else spec.get("rayClusterSpec" if kind == "RayJob" else "rayClusterConfig")
    cspec = cspec or {}
    nodes = [_group_node("head", cspec.get("headGroupSpec") or {}, True)]
    for g in cspec.get("workerGroupSpecs") or []:
        nodes.append(_group_node(g.get("groupName", "?"), g, False))
    cl = Cluster(path, f"{path} ({kind} {name})", "kuberay", "kubernetes", nodes)
    if kind == "RayJob":
        cl.entrypoint = spec.get("entrypoint")
    if kind == "RayService":
        try:
            serve = yaml.safe_load(spec.get("serveConfigV2") or "") or {}
        except yaml.YAMLError:
            serve = {}
        for app in serve.get("applications") or []:
            if str(app.get("import_path", "")).startswith("pipelines.serve"):
                cl.serve_args.append(app.get("args") or {})
    return cl, cspec.get("rayVersion")


def crd_schema(crd_path: Path, version: str = "v1") -> dict:
    """The openAPIV3Schema of a CRD file's `version`."""
    crd = yaml.load(Path(crd_path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 20k lines
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise SubqError(f"no version {version} in the CRD", source=str(crd_path))


def unknown_keys(instance: Any, schema: dict, path: str = "") -> list[str]:
    """Keys of `instance` that `schema` does not know: an object schema with `properties` and no
    `additionalProperties` / `x-kubernetes-preserve-unknown-fields` lists every key it accepts (Kubernetes prunes
    the rest silently, so a misspelled key would pass `jsonschema` and do nothing)."""
    out: list[str] = []
    if not isinstance(schema, dict):
        return out
    if isinstance(instance, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in instance.items():
            if props is not None and k in props:
                out += unknown_keys(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                out += unknown_keys(v, extra, f"{path}.{k}")
            elif props is not None and not extra and not schema.get("x-kubernetes-preserve-unknown-fields"):
                out.append(f"{path}.{k}".lstrip("."))
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(instance):
            out += unknown_keys(v, schema["items"], f"{path}[{i}]")
    return out


def schema_problems(doc: dict, schema: dict, source: str) -> list[str]:
    """A manifest against its CRD schema: jsonschema errors on `spec`, then keys the schema does not know."""
    import jsonschema

    spec_schema = schema["properties"]["spec"]
    errs = [f"{source}: spec.{'.'.join(map(str, e.absolute_path))}: {e.message} (CRD schema)"
            for e in jsonschema.Draft7Validator(spec_schema).iter_errors(doc.get("spec") or {})]
    errs += [f"{source}: spec.{k}: not a field of {doc.get('kind')} (CRD schema; Kubernetes would drop it)"
             for k in unknown_keys(doc.get("spec") or {}, spec_schema)]
    return errs


# ------------------------------------------------------------------------------------------------ README


@dataclass
class Command:
    source: str
    line: int
    text: str


def shell_commands(path: str, text: str) -> list[Command]:
    """`subq ...` commands in a Markdown file's ```bash blocks (backslash continuations joined)."""
    out, in_block, buf, start = [], False, "", 0
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            in_block = line.strip() in ("```bash", "```sh", "```shell") if not in_block else False
            buf = ""
            continue
        if not in_block:
            continue
        if not buf:
            start = i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        full = (buf + line).strip()
        buf = ""
        for part in re.split(r"\s*(?:;|&&)\s*", full):
            if part.startswith("subq ") or re.match(r"^[A-Z_]+=\S+\s+subq ", part):
                out.append(Command(path, start, part))
    return out


def gpu_workers(cmd: str) -> Optional[int]:
    """N of `--num-workers N` in a `subq [submit] train` command with `--use-gpu` (None otherwise)."""
    try:
        words = shlex.split(cmd.split("#", 1)[0])
    except ValueError:
        words = cmd.split()
    if "train" not in words[:4] or "--use-gpu" not in words:
        return None
    n = 1
    for i, w in enumerate(words):
        if w == "--num-workers" and i + 1 < len(words):
            n = int(words[i + 1])
        elif w.startswith("--num-workers="):
            n = int(w.split("=", 1)[1])
    return n


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
