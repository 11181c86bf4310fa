"""Every subcommand answers --help (the console script, as a user types it)."""

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
    c = check_deepspeed_ops(build=False)
    assert c.status == "warn" and f"rm {lock}" in c.detail and lock.exists(), c
    old = time.time() - 3600  # what a build killed an hour ago leaves: no builder works in that directory
    os.utime(lock, (old, old))
    c = check_deepspeed_ops(build=False)
    assert not lock.exists() and "removed a stale build lock" in c.detail and "not built yet" in c.detail, c
