"""issue 23: `subq cluster check` on the shipped cluster files and on broken variants; the KubeRay manifests against
KubeRay's CRD schemas; the install the launcher runs, executed for real in a sandbox (slow)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines import cluster_check as check
from pipelines import cluster_files as files

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT.parent / "shared" / "kuberay"  # KubeRay's CRDs and samples (tests only; the product never reads them)
MANIFESTS = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))


def _launcher() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def _run(tmp_path, cfg: dict | None = None, readme: str | None = None, extra: list | None = None) -> check.Report:
    """check_files on a launcher YAML (default: the shipped one) + the README (default: the shipped one)."""
    y = ROOT / "ray_cluster.yaml"
    if cfg is not None:
        y = tmp_path / "ray_cluster.yaml"
        y.write_text(yaml.safe_dump(cfg))
    r = ROOT / "README.md"
    if readme is not None:
        r = tmp_path / "README.md"
        r.write_text(readme)
    return check.check_files([str(y), str(r), *(extra or [])])


def test_shipped_cluster_files_pass_and_the_table_shows_effective_commands(capfd):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as e:
        main(["cluster", "check"])
    out = capfd.readouterr().out
    assert e.value.code == 0, out
    assert "ok: 6 file(s), 0 problem(s)" in out
    # per node type: image, resources, min-max, the effective commands Ray runs there, the IAM profile
    assert re.search(r"cpu_generation\s+0-32 workers\s+image rayproject/ray:2\.60\.0-py310-cpu", out)
    assert re.search(r"gpu_train_serve\s+0-4 workers\s+image rayproject/ray:2\.60\.0-py310-gpu", out)
    assert "setup: bash ~/subq/cluster/install_node.sh gpu ; nvidia-smi -L" in out
    assert "IAM profile subq-worker-v1" in out and "service account subq-s3" in out
    assert re.search(r"generation\s+0-32 workers\s+image subq:2\.60\.0-py310-cpu", out)  # the KubeRay group


def test_per_type_commands_without_ray_are_found_through_rays_merge_rule(tmp_path):
    """issue 23 (1): a node type's own worker_setup_commands replace the global setup_commands (Ray's rule), so
    the venv + Ray installed there never reach cpu_generation; the head still gets them (merged, not replaced)."""
    cfg = _launcher()
    del cfg["docker"]
    cfg["available_node_types"]["gpu_train_serve"].pop("docker")
    cfg["setup_commands"] = ["python3 -m venv ~/venv", "~/venv/bin/pip install -q 'ray[default]==2.60.0'"]
    cfg["available_node_types"]["cpu_generation"]["worker_setup_commands"] = [
        "~/venv/bin/pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"]
    rep = _run(tmp_path, cfg)
    probs = "\n".join(rep.problems)
    assert "node type 'cpu_generation': its effective setup commands do not install the project" in probs
    assert "node type 'cpu_generation': nothing installs Ray 2.60.0" in probs
    assert "node type 'cpu_generation': its effective setup commands use the venv ~/venv, which none" in probs
    assert "'head'" not in probs and "'gpu_train_serve'" not in probs, probs
    assert not rep.ok


def test_head_commands_without_boto3(tmp_path):
    """issue 23 (2): head_setup_commands replace Ray's default, which is what installs boto3."""
    cfg = _launcher()
    cfg["head_setup_commands"] = [c for c in cfg["head_setup_commands"] if "boto3" not in c]
    rep = _run(tmp_path, cfg)
    assert len(rep.problems) == 1 and "head 'head'" in rep.problems[0] and "boto3" in rep.problems[0], rep.problems


def test_worker_without_s3_access(tmp_path):
    """issue 23 (4): the README writes s3://; the launcher gives its IAM profile to the head only."""
    cfg = _launcher()
    del cfg["available_node_types"]["gpu_train_serve"]["node_config"]["IamInstanceProfile"]
    rep = _run(tmp_path, cfg)
    assert len(rep.problems) == 1, rep.problems
    assert "node type 'gpu_train_serve': no IamInstanceProfile" in rep.problems[0] and "s3://" in rep.problems[0]
    # without s3:// anywhere (a README that writes local paths only) the same YAML is fine
    readme = (ROOT / "README.md").read_text().replace("s3://", "/mnt/shared/")
    assert _run(tmp_path, cfg, readme=readme).ok


def test_a_resource_no_node_type_offers(tmp_path):
    """Teacher actors request `generation` (GenerateConfig); a cluster whose types do not offer it never runs them.
    The same on KubeRay: a RayCluster without a GPU group cannot host Train workers or GPU decomposer replicas."""
    cfg = _launcher()
    cfg["available_node_types"]["cpu_generation"]["resources"] = {"CPU": 8}
    rep = _run(tmp_path, cfg)
    assert len(rep.problems) == 1 and "teacher actor" in rep.problems[0] and "generation: 1" in rep.problems[0]

    rc = yaml.safe_load((ROOT / "cluster/kuberay/raycluster.yaml").read_text())
    rc["spec"]["workerGroupSpecs"] = [g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] != "gpu"]
    (tmp_path / "rc.yaml").write_text(yaml.safe_dump(rc))
    probs = check.check_files([str(tmp_path / "rc.yaml")]).problems
    assert len(probs) == 2 and all("RayCluster subq" in p for p in probs), probs
    assert any("Ray Train worker" in p and "GPU: 1" in p for p in probs)
    assert any("GPU decomposer replica" in p for p in probs)


def test_num_workers_above_the_gpu_maximum(tmp_path):
    """`--num-workers N --use-gpu` in the README's commands against the GPUs the node types can ever have; a
    RayJob's entrypoint against its own cluster."""
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"--use-gpu --num-workers \d+ ", readme)
    rep = _run(tmp_path, readme=re.sub(r"--use-gpu --num-workers \d+ ", "--use-gpu --num-workers 9 ", readme, count=1))
    assert len(rep.problems) == 1, rep.problems
    assert re.search(r"README\.md:\d+: `--num-workers 9 --use-gpu` needs 9 GPU workers; ray_cluster\.yaml .* at "
                     r"most 4 \(gpu_train_serve: 4 x 1\)", rep.problems[0]), rep.problems[0]

    job = yaml.safe_load((ROOT / "cluster/kuberay/rayjob-train.yaml").read_text())
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = 2
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    probs = check.check_files([str(tmp_path / "job.yaml")]).problems
    assert len(probs) == 1 and "`--num-workers 4 --use-gpu`" in probs[0] and "at most 2" in probs[0], probs


def test_python_and_ray_versions_that_disagree(tmp_path, capfd):
    """issue 23 (3) and the version rule: commands that call a Python the image lacks; image tags, rayVersion and
    pip pins against pyproject.toml's ray pin. The CLI exits 1 and prints one error line per problem."""
    from pipelines.cli import main

    cfg = _launcher()
    cfg["head_setup_commands"].insert(0, "python3.11 -m venv ~/subq-venv || true")
    cfg["available_node_types"]["gpu_train_serve"]["docker"]["worker_image"] = "rayproject/ray:2.59.0-py310-gpu"
    cfg["worker_setup_commands"] = ["pip install 'ray[default]==2.59.0'"] + cfg["worker_setup_commands"]
    y = tmp_path / "bad.yaml"
    y.write_text(yaml.safe_dump(cfg))
    rc = yaml.safe_load((ROOT / "cluster/kuberay/raycluster.yaml").read_text())
    rc["spec"]["rayVersion"] = "2.52.0"
    (tmp_path / "rc.yaml").write_text(yaml.safe_dump(rc))
    with pytest.raises(SystemExit) as e:
        main(["cluster", "check", str(y), str(tmp_path / "rc.yaml")])
    out = capfd.readouterr().out
    assert e.value.code == 1
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    # three, not four: the global worker_setup_commands' ray==2.59.0 reaches no node type (each has its own
    # list, which replaces it: Ray's merge rule, not a text search)
    assert len(errors) == 3, errors
    assert any("head 'head': commands call python3.11 but image rayproject/ray:2.60.0-py310-cpu has Python 3.10"
               in ln for ln in errors)
    assert any("'gpu_train_serve': image rayproject/ray:2.59.0-py310-gpu has Ray 2.59.0" in ln for ln in errors)
    assert any("rayVersion is 2.52.0, pyproject.toml pins ray==2.60.0" in ln for ln in errors)


def test_kuberay_manifests_match_their_crds_and_the_launcher_yaml():
    """Each manifest's spec validates against its CRD's v1 openAPIV3Schema (jsonschema) with no key the schema
    does not know; the operator's own samples pass the same walker (it is not stricter than KubeRay); a misspelled
    key and a wrong type are caught. Groups, resources and Ray version agree with ray_cluster.yaml and
    pyproject.toml."""
    if not (KUBERAY / "crds").is_dir():
        pytest.skip("KubeRay CRDs not found at ../shared/kuberay")
    schemas = {k: files.crd_schema(KUBERAY / "crds" / f"ray.io_{k.lower()}s.yaml") for k in check.KUBERAY_KINDS}
    kinds = set()
    for m in MANIFESTS:
        doc = yaml.safe_load(m.read_text())
        kinds.add(doc["kind"])
        assert check.schema_problems(doc, schemas[doc["kind"]], m.name) == []
    assert kinds == set(check.KUBERAY_KINDS)
    for s in sorted((KUBERAY / "samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(s.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in schemas:
                assert check.schema_problems(doc, schemas[doc["kind"]], s.name) == [], s.name
    bad = yaml.safe_load((ROOT / "cluster/kuberay/raycluster.yaml").read_text())
    bad["spec"]["workerGroupSpecs"][0]["minReplica"] = 0
    bad["spec"]["workerGroupSpecs"][1]["maxReplicas"] = "four"
    probs = check.schema_problems(bad, schemas["RayCluster"], "bad")
    assert any("spec.workerGroupSpecs[0].minReplica: not a field of RayCluster" in p for p in probs), probs
    assert any("workerGroupSpecs.1.maxReplicas" in p and "'four'" in p for p in probs), probs

    # agreement with the launcher YAML and pyproject.toml
    pin = files.project_pins()["ray"]
    launcher = {n.name: n for n in files.effective_launcher_nodes(_launcher())[1]}
    rc = yaml.safe_load((ROOT / "cluster/kuberay/raycluster.yaml").read_text())
    cl, version = files._kuberay("raycluster.yaml", rc)
    groups = {n.name: n for n in cl.nodes}
    assert version == pin
    pairs = {"head": "head", "generation": "cpu_generation", "gpu": "gpu_train_serve"}
    for g, t in pairs.items():
        assert groups[g].resources == {k: float(v) for k, v in launcher[t].resources.items()}, (g, t)
        assert (groups[g].min_workers, groups[g].max_workers) == ((1, 1) if g == "head" else
                                                                  (launcher[t].min_workers, launcher[t].max_workers))
        kind = "gpu" if g == "gpu" else "cpu"
        assert groups[g].image == f"subq:{pin}-py310-{kind}"
        assert launcher[t].image == f"rayproject/ray:{pin}-py310-{kind}"
    for m in MANIFESTS:
        text = m.read_text()
        assert set(re.findall(r'rayVersion: "([^"]+)"', text)) == {pin}
        assert set(re.findall(r"image: subq:([\d.]+)-", text)) == {pin}
    assert f"FROM rayproject/ray:{pin}-py310-${{KIND}}" in (ROOT / "Dockerfile").read_text()
    job = yaml.safe_load((ROOT / "cluster/kuberay/rayjob-train.yaml").read_text())
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["NCCL_SOCKET_IFNAME"] == "^docker0,lo" and "s3://" in job["spec"]["entrypoint"]


def _readme_cluster_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        buf = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            full = (buf + line).split(" #", 1)[0].strip()
            buf = ""
            cmds += [p.strip() for p in re.split(r"\s*(?:;|&&)\s*", full) if p.strip()]
    return cmds


def test_readme_cluster_commands_name_only_settings_that_exist():
    """Every `subq ...` and `ray ...` command in the README's cluster section: the verb exists and each --option
    is one of its options (subq's typer app, Ray's click CLI); `subq submit T -- ...` options belong to `subq T`."""
    import typer
    from ray.scripts.scripts import cli as ray_cli

    from pipelines.cli import app

    subq_cli = typer.main.get_command(app)

    def resolve(group, words: list[str]):  # typer's click and Ray's click are different packages: duck-typed
        while hasattr(group, "commands") and words and words[0] in group.commands:
            group, words = group.commands[words[0]], words[1:]
        return group, words

    def names(cmd) -> set[str]:
        return {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}

    seen = 0
    for c in _readme_cluster_commands():
        words = c.split()
        while words and re.match(r"^[A-Z_]+=", words[0]):  # NAME=value prefixes
            words = words[1:]
        if not words or words[0] not in ("subq", "ray"):
            continue
        cmd, rest = resolve(subq_cli if words[0] == "subq" else ray_cli, words[1:])
        assert not hasattr(cmd, "commands"), f"no such command: {c}"
        before, _, after = f" {' '.join(rest)} ".partition(" -- ")
        for opt in re.findall(r"(?<!\S)(--[\w-]+)", before):
            assert opt in names(cmd), f"{opt} is not an option of `{' '.join(words[:3])}`: {c}"
        if after:
            target, _ = resolve(subq_cli, [words[2]])
            for opt in re.findall(r"(?<!\S)(--[\w-]+)", after):
                assert opt in names(target), f"{opt} is not an option of `subq {words[2]}`: {c}"
        seen += 1
    assert seen >= 8


def _copy_like_rsync(src: Path, dst: Path, excludes: list, filters: list) -> None:
    """rsync -a with `--exclude PATTERN` and `--filter 'dir-merge,- FILE'` for the patterns used here (where no
    rsync is installed): a leading / anchors at the transfer root, a pattern without / matches a name at any level,
    `**/x` matches x at any depth; FILE's lines (a .gitignore) are read per directory, as rsync's dir-merge does."""
    import fnmatch

    def excluded(rel: str, pats: list) -> bool:
        name = rel.rsplit("/", 1)[-1]
        for p in pats:
            p = p.rstrip("/")
            if p.startswith("/"):
                if fnmatch.fnmatch(rel, p[1:]):
                    return True
            elif p.startswith("**/"):
                if fnmatch.fnmatch(name, p[3:]):
                    return True
            elif "/" in p:
                if fnmatch.fnmatch(rel, p):
                    return True
            elif fnmatch.fnmatch(name, p):
                return True
        return False

    def walk(d: Path, rel: str, pats: list) -> None:
        local = list(pats)
        for f in filters:
            if (d / f).is_file():
                for line in (d / f).read_text().splitlines():
                    line = line.strip()
                    if line and not line.startswith("#"):
                        local.append("/" + (rel + "/" if rel else "") + line.lstrip("/") if line.startswith("/")
                                     else line)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for child in sorted(d.iterdir()):
            r = f"{rel}/{child.name}" if rel else child.name
            if excluded(r, local):
                continue
            if child.is_dir() and not child.is_symlink():
                walk(child, r, local)
            else:
                shutil.copy2(child, dst / r, follow_symlinks=False)

    walk(src, "", list(excludes))


def _wheelhouse(out: Path) -> Path:
    """This machine's installed distributions (the suite's own venv) packed back into wheels, so the sandbox's pip
    installs the project's requirements from local files instead of downloading ~1 GB from PyPI (pip's HTTP cache
    stays empty on this machine). Each wheel keeps its dist-info (METADATA, WHEEL tags, entry points); pip still
    resolves every requirement itself. Skipped: torch (the local CPU wheel), subq, pip."""
    import importlib.metadata as md
    import zipfile

    out.mkdir(parents=True, exist_ok=True)
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if not name or name.lower() in ("torch", "subq", "pip") or not dist.files:
            continue
        info = Path(str(dist._path))  # noqa: SLF001 - the dist-info directory
        tags = [ln.split(":", 1)[1].strip() for ln in (info / "WHEEL").read_text().splitlines()
                if ln.startswith("Tag:")] if (info / "WHEEL").is_file() else ["py3-none-any"]
        site = info.parent
        files = [f for f in dist.files if not str(f).startswith("..") and "__pycache__" not in str(f)
                 and f.name not in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")]
        parts = [t.split("-") for t in tags]  # the compressed tag set, as in py2.py3-none-any
        tag = "-".join(".".join(dict.fromkeys(p[i] for p in parts)) for i in range(3))
        whl = out / f"{re.sub(r'[-_.]+', '_', name)}-{dist.version}-{tag}.whl"
        with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
            record = []
            for f in files:
                src = site / f
                if src.is_file():
                    z.write(src, str(f))
                    record.append(f"{f},,")
            record.append(f"{info.name}/RECORD,,")
            z.writestr(f"{info.name}/RECORD", "\n".join(record) + "\n")
    return out


@pytest.mark.slow
def test_sandbox_install_runs_the_cpu_worker_commands_for_real(tmp_path):
    """issue 23: the CPU worker type's effective launcher commands (from Ray's per-type lookup), run for real in a
    sandbox: a fresh HOME holding the checkout where file_mounts put it (~/subq, rsync'ed with the YAML's
    rsync_exclude and rsync_filter), a fresh venv from this machine's python standing in for the image's Python,
    no sudo, no cloud. At the end the pinned `ray --version` and the project's imports work there.
    download.pytorch.org is unreachable here: the test serves torch's CPU wheel from a local PEP 503 index
    (SUBQ_TORCH_INDEX_URL, the script's documented setting) and lets everything else come from PyPI."""
    cfg = _launcher()
    nodes = {n.name: n for n in files.effective_launcher_nodes(cfg)[1]}
    setup = nodes["cpu_generation"].setup
    assert setup == ["bash ~/subq/cluster/install_node.sh cpu"]
    wheels = sorted(Path("/opt/wheels").glob("torch-*+cpu-*.whl"))
    if not wheels:
        pytest.skip("needs a local torch CPU wheel (/opt/wheels): download.pytorch.org is not reachable here")
    home = tmp_path / "home"
    home.mkdir()
    # file_mounts "~/subq": "." with rsync_exclude / rsync_filter, as Ray's updater runs rsync
    if shutil.which("rsync"):
        args = ["rsync", "-a"] + [a for x in cfg["rsync_exclude"] for a in ("--exclude", x)] + \
            [a for f in cfg.get("rsync_filter", []) for a in ("--filter", f"dir-merge,- {f}")]
        subprocess.run(args + [f"{ROOT}/", f"{home}/subq/"], check=True)
    else:
        _copy_like_rsync(ROOT, home / "subq", cfg["rsync_exclude"], cfg.get("rsync_filter", []))
    assert not (home / "subq" / ".venv").exists() and (home / "subq" / "subq" / "data").is_dir()
    index = tmp_path / "torch-index" / "torch"
    index.mkdir(parents=True)
    (index / "index.html").write_text("".join(f'<a href="file://{w}">{w.name}</a>\n' for w in wheels))
    venv = tmp_path / "image-python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    t0 = time.time()
    house = _wheelhouse(tmp_path / "wheelhouse")
    t_house = time.time() - t0
    # pip's own settings, not the commands: no index (the commands' --index-url for torch included), wheels from
    # the local wheelhouse and the torch CPU wheel; nothing is compiled to .pyc (time)
    env = {"HOME": str(home), "PATH": f"{venv}/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "SUBQ_TORCH_INDEX_URL": f"file://{tmp_path / 'torch-index'}", "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": f"{house} {wheels[0].parent}", "PIP_NO_COMPILE": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    t0 = time.time()
    for cmd in setup:
        r = subprocess.run(["bash", "-c", cmd], cwd=home, env=env, capture_output=True, text=True, timeout=1500)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    pin = files.project_pins()["ray"]
    r = subprocess.run(["bash", "-c", "ray --version"], cwd=home, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and re.search(rf"\b{re.escape(pin)}\b", r.stdout), r.stdout + r.stderr
    r = subprocess.run(["bash", "-c", "cd / && python -c 'import subq, actors, pipelines, training, cluster, torch; "
                        "print(subq.__file__, torch.__version__)'"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and f"{home}/subq/subq/__init__.py" in r.stdout and "+cpu" in r.stdout, r.stderr
    print(f"sandbox: wheelhouse {t_house:.0f} s, install + checks {time.time() - t0:.0f} s")
