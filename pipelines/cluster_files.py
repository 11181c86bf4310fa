"""What `subq cluster check` reads, and how: a launcher YAML through Ray's own config code (the nodes it would really
start, with their effective setup and start commands), KubeRay manifests (groups, `ray start` resources, CRD
schemas), the README's shell commands, and the project's and images' version pins. No cloud or Kubernetes API is
contacted; the checks themselves are pipelines.cluster_check."""

from __future__ import annotations

import copy
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from subq.errors import SubqError


ROOT = Path(__file__).resolve().parents[1]


# providers whose "nodes" are processes on this machine: no node updater runs setup commands there
LOCAL_PROVIDERS = ("fake_multinode", "fake_multinode_docker")


_IMAGE_TAG = re.compile(r"^(?P<version>\d+\.\d+\.\d+)(?:-py(?P<py>\d)(?P<pyminor>\d+))?(?:-(?P<platform>[A-Za-z0-9.]+))?")


_PY_CALL = re.compile(r"(?<![\w.-])python(?P<v>3\.\d+)\b")


_RAY_PIN = re.compile(r"""\bray(?:\[[^\]]*\])?==(?P<v>[0-9][\w.]*)""")


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
