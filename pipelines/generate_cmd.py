"""`subq generate` and `subq teacher-server` (see pipelines.generate and pipelines.teacher_server for the commands
and the output layout). Ray, FastAPI and the openai SDK are imported inside the commands so `subq --help` is fast."""

from __future__ import annotations

import json
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    from pipelines.generate_config import GenerateConfig
    from subq.cli_options import config_command

    @app.command("generate")
    @config_command(GenerateConfig)
    def generate(config_path: Optional[str], overrides: dict) -> None:
        """Generate GSM8K-AI-SubQ rows (QG -> QA -> feedback -> rewards) with Ray Data over rate-limited teacher
        actors; resumable (durable request cache), exactly one row per problem, failures recorded. Prints
        progress to stderr and the summary JSON as the last stdout line."""
        from pipelines.generate import run_generate
        from subq import console
        from subq.config import load_config

        cfg = load_config(GenerateConfig, config_path, overrides)
        if not cfg.dry_run:
            console.activate("generate")
        console.emit_json(run_generate(cfg))

    @app.command("teacher-server")
    def teacher_server(
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind."),
        port: int = typer.Option(8300, "--port", help="TCP port."),
        rpm: Optional[float] = typer.Option(None, "--rpm", help="Requests/minute limit (429 + Retry-After beyond it)."),
        tpm: Optional[float] = typer.Option(None, "--tpm", help="Tokens/minute limit."),
        burst_s: float = typer.Option(1.0, "--burst-s", help="Bucket capacity in seconds of the limit."),
        latency_ms: float = typer.Option(0.0, "--latency-ms", help="Mean reply latency."),
        latency_jitter_ms: float = typer.Option(0.0, "--latency-jitter-ms", help="Latency std-dev."),
        fail_rate: float = typer.Option(0.0, "--fail-rate", help="Share of requests answered 500/503."),
        malformed_rate: float = typer.Option(0.0, "--malformed-rate", help="Share answered with an unparseable reply."),
        malformed_body_share: float = typer.Option(0.5, "--malformed-body-share", help="Share of the malformed replies that are a truncated body (the rest: a reply in no expected format)."),
        timeout_rate: float = typer.Option(0.0, "--timeout-rate", help="Share that hang, then 504."),
        timeout_hang_s: float = typer.Option(30.0, "--timeout-hang-s", help="How long a 'timeout' hangs."),
        require_key_env: Optional[str] = typer.Option(None, "--require-key-env", help="Require the key held in this env var (401 otherwise)."),
        model: Optional[list[str]] = typer.Option(None, "--model", help="Repeatable: serve only these model names (404 otherwise)."),
        seed: int = typer.Option(0, "--seed", help="RNG seed for faults and latency."),
        batch_api: bool = typer.Option(True, "--batch-api/--no-batch-api", help="Serve the Batch API (/v1/files, /v1/batches)."),
        batch_delay_s: float = typer.Option(1.0, "--batch-delay-s", help="Processing time of one batch."),
        batch_error_rate: float = typer.Option(0.0, "--batch-error-rate", help="Share of batch requests answered with a per-request 500."),
        batch_malformed_rate: float = typer.Option(0.0, "--batch-malformed-rate", help="Share of batch requests answered with a reply in no expected format."),
        batch_expire_first: int = typer.Option(0, "--batch-expire-first", help="The first N batches expire after half their requests."),
        batch_bad_output_first: int = typer.Option(0, "--batch-bad-output-first", help="The first N completed batches get a bad output file."),
        batch_bad_output: str = typer.Option("malformed", "--batch-bad-output", help="malformed | missing."),
        batch_upload_fail_first: int = typer.Option(0, "--batch-upload-fail-first", help="The first N uploads answer 500."),
    ) -> None:
        """A local OpenAI-compatible teacher server: replays the released ChatGPT replies (GSM8K-AI-SubQ test),
        synthesises labelled replies from GSM8K gold solutions for everything else; rate limits with 429 +
        Retry-After + x-ratelimit-* headers, injected faults, and GET /v1/stats counting every request."""
        import os

        from pipelines.teacher_server import TeacherServerConfig, serve
        from subq.errors import ConfigError

        for name, v in (("--fail-rate", fail_rate), ("--malformed-rate", malformed_rate), ("--timeout-rate", timeout_rate),
                        ("--malformed-body-share", malformed_body_share), ("--batch-malformed-rate", batch_malformed_rate)):
            if not 0 <= v <= 1:
                raise ConfigError("must be between 0 and 1", field=name)
        if fail_rate + malformed_rate + timeout_rate > 1:
            raise ConfigError("fault rates add up to more than 1", field="--fail-rate")
        if not 0 <= batch_error_rate <= 1:
            raise ConfigError("must be between 0 and 1", field="--batch-error-rate")
        if batch_bad_output not in ("malformed", "missing"):
            raise ConfigError("expected malformed or missing", field="--batch-bad-output")
        key = None
        if require_key_env:
            key = os.environ.get(require_key_env)
            if not key:
                raise ConfigError(f"environment variable {require_key_env} is not set", field="--require-key-env")
        typer.echo(f"teacher server on http://{host}:{port}/v1", err=True)
        serve(TeacherServerConfig(host=host, port=port, rpm=rpm, tpm=tpm, burst_s=burst_s, latency_s=latency_ms / 1000,
                                  latency_jitter_s=latency_jitter_ms / 1000, fail_rate=fail_rate,
                                  malformed_rate=malformed_rate, malformed_body_share=malformed_body_share,
                                  timeout_rate=timeout_rate, batch_malformed_rate=batch_malformed_rate,
                                  timeout_hang_s=timeout_hang_s, api_key=key, models=model or None, seed=seed,
                                  batch_api=batch_api, batch_delay_s=batch_delay_s, batch_error_rate=batch_error_rate,
                                  batch_expire_first=batch_expire_first, batch_bad_output_first=batch_bad_output_first,
                                  batch_bad_output=batch_bad_output, batch_upload_fail_first=batch_upload_fail_first))
