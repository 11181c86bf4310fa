"""Every subcommand answers --help (the console script, as a user types it)."""

import subprocess

from subq.cli import app
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
