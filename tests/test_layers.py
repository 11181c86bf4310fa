"""The house rules, drawn from the code's own imports (../shared/docs/redesign.md, issue 25). No Ray, under a second.

Every import is counted: module level and inside functions, and the string argument of `importlib.import_module`.
(a) a room imports only rooms on a lower floor (or itself); (b) no circle between files; (c) the core imports no
layer and loads nothing by name; (d) every path in the README's "Where each concept lives" table exists.
Today's violations are listed in ALLOWED_* below with what removes them; each entry is a debt, and a rule that
stops being broken must leave the list (the test says so), so the lists only shrink.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"subq": 1, "cluster": 2, "actors": 3, "training": 3, "pipelines": 4, "benchmarks": 5}
ROOMS = tuple(FLOORS)

# (importer file, imported room) arrows that break (a) today, and the redesign step that removes each.
# Emptied by step 8 (the front door moved to pipelines/cli.py; `subq doctor` and `subq cluster check`, which read the
# jobs' config models, moved beside it as pipelines/doctor.py and pipelines/cluster_check.py).
ALLOWED_ARROWS: dict[tuple[str, str], str] = {}

# files in subq/ that load modules by name (emptied by step 8: the front door imports each verb by a plain import)
ALLOWED_IMPORT_MODULE: dict[str, str] = {}


def _py_files() -> list[Path]:
    return sorted(p for room in ROOMS for p in (REPO / room).rglob("*.py") if "__pycache__" not in p.parts)


def _module_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """(modules this file imports, import_module string arguments)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    mods: set[str] = set()
    by_name: list[str] = []
    pkg = _module_of(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_of(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            mods.add(base)
            mods.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name == "import_module":
                by_name.append(ast.unparse(node.args[0]) if node.args else "")
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    mods.add(node.args[0].value)
    # import_module over a list of names (as the old subq/cli.py's COMMAND_MODULES): count that list's string constants
    if by_name:
        for node in ast.walk(tree):
            if isinstance(node, (ast.List, ast.Tuple)):
                for elt in node.elts:
                    if isinstance(elt, ast.Constant) and isinstance(elt.value, str) and elt.value.split(".")[0] in ROOMS:
                        mods.add(elt.value)
    return mods, by_name


def _graph() -> dict[str, set[str]]:
    files = _py_files()
    known = {_module_of(p): p.relative_to(REPO).as_posix() for p in files}
    graph: dict[str, set[str]] = {}
    for p in files:
        src = p.relative_to(REPO).as_posix()
        mods, _ = _imports(p)
        targets = set()
        for m in mods:
            while m and m not in known:  # `from pkg.mod import name` -> pkg.mod
                m = m.rpartition(".")[0]
            if m and known[m] != src:
                targets.add(known[m])
        graph[src] = targets
    return graph


def _circles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Strongly connected components of more than one file (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), set(), [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(tuple(sorted(comp)))

    import sys

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# Today's circles (redesign 1.1): the batch <-> generate pair, training's decomposer -> preflight -> train
# -> decomposer. (The front door's circle, subq/cli.py loading every layer by name while each job's main() imported it
# back, is gone: pipelines/cli.py imports each verb, and each job's `python -m` twin is its package's __main__.py.)
# Each entry names the step that removes it; the check below keeps the list honest.
KNOWN_CIRCLE_MEMBERS = {
}


def test_arrows_only_run_down_the_floors():
    bad = {}
    for src, targets in _graph().items():
        room = src.split("/")[0]
        for t in targets:
            troom = t.split("/")[0]
            if troom != room and FLOORS[troom] >= FLOORS[room]:
                bad.setdefault((src, troom), t)
    new = {k: v for k, v in bad.items() if k not in ALLOWED_ARROWS}
    assert not new, f"imports that run up or sideways between rooms: {new}"
    gone = set(ALLOWED_ARROWS) - set(bad)
    assert not gone, f"fixed: remove from ALLOWED_ARROWS: {gone}"


def test_no_circles_between_files_beyond_the_known_ones():
    circles = _circles(_graph())
    unexplained = [c for c in circles if not any(m in c for m in KNOWN_CIRCLE_MEMBERS)]
    assert not unexplained, f"new import circles: {unexplained}"
    gone = {m for m in KNOWN_CIRCLE_MEMBERS if not any(m in c for c in circles)}
    assert not gone, f"circles broken: remove from KNOWN_CIRCLE_MEMBERS: {gone}"


def test_the_core_loads_no_module_by_name_and_imports_no_ray_or_torch_at_module_level():
    by_name = {p.relative_to(REPO).as_posix() for p in (REPO / "subq").rglob("*.py") if _imports(p)[1]}
    assert by_name == set(ALLOWED_IMPORT_MODULE), f"import_module in subq/: {by_name}"
    for p in (REPO / "subq").rglob("*.py"):
        tree = ast.parse(p.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
        assert not names & {"ray", "torch", "transformers", "deepspeed"}, f"{p}: heavy import at module level"


def test_every_path_in_the_readme_concept_table_exists():
    text = (REPO / "README.md").read_text()
    table = text.split("## Where each concept lives", 1)[1].split("\n## ", 1)[0]
    paths = re.findall(r"`([\w./-]+\.(?:py|yaml|sh)|[\w-]+/(?:[\w./-]*/)?)`", table)
    assert len(paths) > 20, paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"README names paths that do not exist: {missing}"


def test_the_import_reader_sees_what_it_claims_to(tmp_path):
    """The rules above hold only if the reader sees function-level imports and import_module strings."""
    probe = REPO / "subq" / f"_probe_{tmp_path.name}.py"  # inside the tree, as a real file is; removed at once
    probe.write_text("import importlib\nMODS = ['pipelines.serve_cmd']\n"
                     "def f():\n    for m in MODS:\n        importlib.import_module(m)\n"
                     "    importlib.import_module('training.train_cmd')\n")
    try:
        mods, by_name = _imports(probe)
    finally:
        probe.unlink()
    assert {"pipelines.serve_cmd", "training.train_cmd"} <= mods and len(by_name) == 2
    g = _graph()
    assert {"pipelines/serve_cmd.py", "training/train_cmd.py", "cluster/cluster_cmd.py"} <= g["pipelines/cli.py"]
    assert "training/ilql.py" in g["training/decomposer.py"]  # a function-level `from training.ilql import ...`


# Files over the 600-line rule, each with why it is one concept (redesign 4.1): none since 2026-12-07.
OVERSIZE: dict[str, str] = {}


def test_no_file_over_600_lines_beyond_the_known_ones():
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in _py_files()}
    big = {f for f, n in sizes.items() if n > 600}
    assert big <= set(OVERSIZE), f"files over 600 lines: {sorted(big - set(OVERSIZE))}"
    assert not set(OVERSIZE) - big, f"now under 600 lines: remove from OVERSIZE: {sorted(set(OVERSIZE) - big)}"


TEST_ROOMS = {"subq", "actors", "cluster", "training", "pipelines", "e2e"}


def test_tests_mirror_the_package_tree():
    """Every test file sits under a folder named after the package it tests (tests/subq/, tests/actors/,
    tests/cluster/, tests/training/, tests/pipelines/ and tests/pipelines/<job>/ for a job package), or under
    tests/e2e/ (the README walk-through, the demo, autoscaling, multi-node); only the house rules and the shared
    fixtures stay at the top."""
    tests = REPO / "tests"
    misplaced = []
    for p in sorted(tests.rglob("test_*.py")):
        rel = p.relative_to(tests)
        if rel.parts == ("test_layers.py",):
            continue
        room, *sub = rel.parts[:-1]
        if room not in TEST_ROOMS or (sub and not (REPO / room / Path(*sub) / "__init__.py").exists()) or len(sub) > 1:
            misplaced.append(rel.as_posix())
    assert not misplaced, f"test files outside the mirrored tree: {misplaced}"
    assert not [p.name for p in tests.rglob("__init__.py")], "no __init__.py under tests/ (rootdir-relative imports)"
