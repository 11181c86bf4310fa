"""Every subcommand answers --help (the console script, as a user types it)."""

import re
import subprocess

from pipelines.cli import app
import typer.main


def test_every_command_has_help(subq_bin):
    out = subprocess.run([subq_bin, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "score" in out.stdout
    group = typer.main.get_command(app)
    names = list(group.commands)
    assert "score" in names
    for name in names:
        cmd = group.commands[name]
        subs = list(getattr(cmd, "commands", {}) or {})
        for argv in [[name]] + [[name, s] for s in subs]:
            r = subprocess.run([subq_bin, *argv, "--help"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (argv, r.stderr)
            assert "Usage" in r.stdout
            assert "<bool>" not in r.stdout, argv  # flags show no type  # flags show no type


def test_doctor_reports_every_check_and_never_a_key_value(subq_bin, tmp_path):
    import json
    import os

    secret = "sk-doctor-test-0123456789"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "OPENAI_API_KEY": secret}
    r = subprocess.run([subq_bin, "doctor", "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert secret not in r.stdout + r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    names = {c["name"]: c for c in report["checks"]}
    assert {"packages", "ray", "deepspeed ops", "torch threads", "memory", "disk", "gpu", "ray auth",
            "teacher key"} <= set(names)
    assert all(c["status"] in ("ok", "warn", "fail") for c in report["checks"])
    assert names["ray"]["status"] == "ok" and "local instance started" in names["ray"]["detail"], names["ray"]
    assert "is set" in names["teacher key"]["detail"]
    assert r.returncode == (1 if any(c["status"] == "fail" for c in report["checks"]) else 0)


def test_doctor_clears_a_stale_extension_build_lock_and_names_the_fix_for_a_fresh_one(tmp_path, monkeypatch):
    import os
    import time

    from pipelines.doctor import check_deepspeed_ops

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()  # a lock seconds old: a build may be starting; reported with the fix, not removed
    c = check_deepspeed_ops()
    assert c.status == "warn" and f"rm {lock}" in c.detail and lock.exists(), c
    old = time.time() - 3600  # what a build killed an hour ago leaves: no builder works in that directory
    os.utime(lock, (old, old))
    c = check_deepspeed_ops()
    assert not lock.exists() and "removed a stale build lock" in c.detail and c.status == "ok", c


def _help(argv: list[str]) -> str:
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, [*argv, "--help"], terminal_width=400)
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())


def _leaves(cls, flatten: tuple[str, ...] = ()) -> dict[str, object]:
    """flag -> default of every field of cls (the flattened nested ones as --field-sub)."""
    from subq.cli_options import _fields, _unwrap_optional, _is_nested

    out = {}
    for name, (ann, default, _, required) in _fields(cls).items():
        if name in flatten and _is_nested(_unwrap_optional(ann)):
            for sub, (_, d, _, req) in _fields(_unwrap_optional(ann)).items():
                out[f"--{name}-{sub}".replace("_", "-")] = None if req else d
        else:
            out[f"--{name}".replace("_", "-")] = None if required else default
    return out


def test_serve_eval_and_teacher_server_help_lists_every_config_field_with_its_default():
    """`--help` of serve, eval and teacher-server shows one option per config field (the nested solver and
    decomposer settings flattened with their prefix) and its default, as generate, train and demo do; the flags
    today's scripts use still work (declared aliases)."""
    from subq.cli_options import _show
    from pipelines.evaluate import EvalConfig
    from pipelines.serve import ServeConfig
    from pipelines.teacher_server import TeacherServerConfig

    for verb, cls, kept in (("serve", ServeConfig, ["--solver-model", "--solver-price-input", "--beta",
                                                     "--sample", "--greedy", "--max-new-tokens", "--api-key-env"]),
                            ("eval", EvalConfig, ["--decomposer", "--solver-model", "--beta", "--solver-price-output"]),
                            ("teacher-server", TeacherServerConfig, ["--latency-ms", "--model", "--require-key-env"])):
        text = _help([verb])
        for flag, default in _leaves(cls, ("decomposer", "solver", "quotas")).items():
            if flag in ("--api-key",):  # a secret is never a flag: --require-key-env names its variable
                continue
            m = re.search(re.escape(flag) + r"[ ,/]", text)
            assert m, (verb, flag)
            seg = text[m.end():]
            first = min(i for i in (seg.find("[default: "), seg.find("[required"), len(seg)) if i >= 0)
            assert seg[first:].startswith((f"[default: {_show(default)}]", "[required")), (verb, flag, seg[:300])
        for flag in kept:
            assert flag in text, (verb, flag)
