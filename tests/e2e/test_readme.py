"""The README is tested: every shell block marked `<!-- runnable -->` runs as written, in order, in one bash session
(`set -euo pipefail`), in a fresh directory, offline, on the local teacher server. Sizes come from the variables the
README documents (N, STEPS, WORKERS, EVAL_N), set small here. A README command that fails fails this test."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import ray_head

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BLOCK = re.compile(r"(?P<mark><!-- runnable -->\s*\n)?```bash\n(?P<code>.*?)```", re.S)
# the sections whose every shell block must be runnable (and so run by this test)
MUST_RUN = ("## Each job alone", "## Scoring")


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) for each `## ` section."""
    parts = re.split(r"(?m)^(## .*)$", text)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def blocks(text: str) -> list[tuple[str, bool, str]]:
    """(section heading, marked runnable, code) for every ```bash block."""
    out = []
    for head, body in sections(text):
        for m in BLOCK.finditer(body):
            out.append((head, bool(m.group("mark")), m.group("code")))
    return out


def test_every_command_block_of_the_job_sections_is_marked_runnable():
    bl = blocks(README.read_text())
    for head in MUST_RUN:
        mine = [b for b in bl if b[0].startswith(head)]
        assert mine, f"README has no shell block under {head!r}"
        unmarked = [code for h, mark, code in mine if not mark]
        assert not unmarked, f"unmarked (so untested) blocks under {head!r}: {unmarked}"


STATED = re.compile(r"^# (\{.*\})\s*$", re.M)
PAIR = re.compile(r'"(?P<k>[\w-]+)": (?P<v>"[^"]*"|-?\d+(?:\.\d+)?(?:e-?\d+)?|true|false|null)')


def stated_results(code: str) -> list[dict]:
    """The results a block states under its command as a `# {...}` comment line: the key/value pairs given
    (an elided value, `...`, is not checked)."""
    import json

    return [{m["k"]: json.loads(m["v"]) for m in PAIR.finditer(line)} for line in STATED.findall(code)]


def printed(out: str, want: dict) -> bool:
    """Whether some line of `out` is a JSON object holding every pair of `want` (floats to 1e-9)."""
    import json

    for line in out.splitlines():
        try:
            got = json.loads(line)
        except ValueError:
            continue
        if isinstance(got, dict) and all(k in got and (got[k] == v if not isinstance(v, float) else
                                                       abs(got[k] - v) <= 1e-9) for k, v in want.items()):
            return True
    return False


def test_stated_results_are_read_and_a_different_result_is_caught():
    stated = [w for _, mark, c in blocks(README.read_text()) if mark for w in stated_results(c)]
    assert stated and all(stated), stated
    score = next(w for w in stated if w.get("mode") == "paper")
    assert score["n"] == 1319 and score["correct"] == 882
    line = json.dumps({"file": "x", **score})
    assert printed("noise\n" + line + "\n", score)
    assert not printed(line.replace('"correct": 882', '"correct": 881'), score)  # a changed result fails


def _kill_session(proc: subprocess.Popen) -> None:
    pgid = proc.pid
    members = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid]
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    _, alive = psutil.wait_procs(members, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _pgid(pid: int):
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


@pytest.mark.slow
@pytest.mark.timeout(1800)  # every README job, three trainings included
def test_readme_runnable_blocks_run_as_written(tmp_path):
    code = [c for _, mark, c in blocks(README.read_text()) if mark]
    assert code, "no runnable block in the README"
    (tmp_path / "subq").symlink_to(REPO / "subq")  # the README's relative paths to the vendored data
    script = "set -euo pipefail\n" + "\n".join(code)
    (tmp_path / "readme.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "RAY_ADDRESS", "SUBQ_VERBOSE")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", N="4", EVAL_N="4",
               STEPS="2", WORKERS="1", SUBQ_LOG_DIR=str(tmp_path / "logs"), HOME=env.get("HOME", str(tmp_path)))
    log = tmp_path / "readme.log"  # a file, not a pipe: the servers the README starts in the background keep it open
    # every verb joins one Ray head through RAY_ADDRESS ("starts a local Ray, or joins RAY_ADDRESS"), as on a
    # cluster: its workers lack the shell's keys (they reach the actors and replicas through the object store);
    # 4 logical CPUs: the server the README leaves running and `subq eval` share it
    with ray_head(num_cpus=4) as head_env, open(log, "w") as f:
        env.update(head_env)
        proc = subprocess.Popen(["bash", str(tmp_path / "readme.sh")], cwd=tmp_path, env=env, start_new_session=True,
                                stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=1500)
        finally:
            _kill_session(proc)  # background servers the README starts
    out = log.read_text()
    assert proc.returncode == 0, f"README blocks failed (exit {proc.returncode}):\n{out[-6000:]}"
    assert '"accuracy"' in out and (tmp_path / "reports" / "eval1" / "report.md").is_file(), out[-3000:]
    for want in (w for c in code for w in stated_results(c)):  # what the README says a command prints, it prints
        assert printed(out, want), (want, out[-3000:])


def test_ci_runs_the_readme_test_command():
    test_cmd = next(c.strip() for _, _, c in blocks(README.read_text()) if "pytest" in c)
    assert test_cmd in (REPO / ".ci" / "run").read_text()
