"""`subq teacher-server` (pipelines.teacher_server): its flags derive from TeacherServerConfig; `--latency-ms`,
`--latency-jitter-ms` (milliseconds) and `--model` (repeatable, each entry of `models`) are kept for existing
scripts. The key a server requires is never a flag: `--require-key-env` names the variable holding it."""

from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    from pipelines.teacher_server_config import TeacherServerConfig
    from subq.cli_options import config_command

    @app.command("teacher-server")
    @config_command(TeacherServerConfig, exclude=("api_key",), repeat=("models",), aliases={"models": ["--model"]},
                    extra={
                        "require_key_env": (Optional[str], typer.Option(
                            None, "--require-key-env", show_default=False,
                            help="Require the key held in this environment variable (401 otherwise).")),
                        "latency_ms": (Optional[float], typer.Option(
                            None, "--latency-ms", show_default=False, help="--latency-s in milliseconds.")),
                        "latency_jitter_ms": (Optional[float], typer.Option(
                            None, "--latency-jitter-ms", show_default=False,
                            help="--latency-jitter-s in milliseconds.")),
                    })
    def teacher_server(config: Optional[str], overrides: dict, require_key_env: Optional[str],
                       latency_ms: Optional[float], latency_jitter_ms: Optional[float]) -> None:
        """A local OpenAI-compatible teacher server: replays the released ChatGPT replies (GSM8K-AI-SubQ test),
        synthesises labelled replies from GSM8K gold solutions for everything else; rate limits with 429 +
        Retry-After + x-ratelimit-* headers, injected faults, the Batch API, a provider bill, and GET /v1/stats
        counting every request."""
        import os

        from pipelines.teacher_server import serve
        from subq.config import read_yaml
        from subq.errors import ConfigError

        values = {**(read_yaml(config) if config else {}), **overrides}
        if "api_key" in values:
            raise ConfigError("a key is never written in a config: use --require-key-env NAME", field="api_key",
                              source=config)
        for name, ms in (("latency_s", latency_ms), ("latency_jitter_s", latency_jitter_ms)):
            if ms is not None:
                values[name] = ms / 1000
        if require_key_env:
            values["api_key"] = os.environ.get(require_key_env)
            if not values["api_key"]:
                raise ConfigError(f"environment variable {require_key_env} is not set", field="--require-key-env")
        try:
            cfg = TeacherServerConfig(**values)
        except TypeError as e:
            raise ConfigError(f"unknown field ({e})", source=config) from None
        typer.echo(f"teacher server on http://{cfg.host}:{cfg.port}/v1", err=True)
        serve(cfg)
