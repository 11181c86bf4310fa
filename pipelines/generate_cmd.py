"""`subq generate` and `subq teacher-server` (see pipelines.generate and pipelines.teacher_server for the commands
and the output layout). Ray, FastAPI and the openai SDK are imported inside the commands so `subq --help` is fast."""

from __future__ import annotations

import json
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        config: Optional[str] = typer.Option(None, "--config", help="YAML file with any GenerateConfig fields; flags override it."),
        input: Optional[str] = typer.Option(None, "--input", help="Dataset name (gsm8k:train, gsm8k:test, gsm8k-ai-subq:test) or .jsonl/.json/.parquet path or URI. [default: gsm8k:train]"),
        output: Optional[str] = typer.Option(None, "--output", help="Output directory or URI (parts/, failures/, cache/, exports, summary.json)."),
        model: Optional[str] = typer.Option(None, "--model", help="Teacher model. [default: gpt-3.5-turbo]"),
        base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8300/v1. [default: api.openai.com]"),
        api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="NAME of the env var holding the key. [default: OPENAI_API_KEY]"),
        template: Optional[str] = typer.Option(None, "--template", help="Prompt template family: paper | doc. [default: paper]"),
        n_sets: Optional[int] = typer.Option(None, "--n-sets", help="Sub-question sets per problem. [default: 3]"),
        n_feedback: Optional[int] = typer.Option(None, "--n-feedback", help="Feedback calls per set. [default: 3]"),
        temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature. [default: 0.7]"),
        max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="max_tokens per call. [default: 512]"),
        rpm: Optional[float] = typer.Option(None, "--rpm", help="Cluster-wide requests/minute cap."),
        tpm: Optional[float] = typer.Option(None, "--tpm", help="Cluster-wide tokens/minute cap."),
        max_concurrency: Optional[int] = typer.Option(None, "--max-concurrency", help="Calls in flight per actor. [default: 32]"),
        actors: Optional[str] = typer.Option(None, "--actors", help="Teacher actor pool MIN,MAX (autoscaling). [default: 1,2]"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Problems per batch / Parquet part. [default: 8]"),
        limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N problems."),
        max_cost_usd: Optional[float] = typer.Option(None, "--max-cost-usd", help="Stop cleanly after this much spend (this run)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the token and cost estimate; no calls."),
        retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry only the problems in the failures table."),
        max_retries: Optional[int] = typer.Option(None, "--max-retries", help="Retries per call. [default: 6]"),
        timeout_s: Optional[float] = typer.Option(None, "--timeout-s", help="Per-request timeout in seconds. [default: 60]"),
        max_retry_after_s: Optional[float] = typer.Option(None, "--max-retry-after-s", help="Longest Retry-After honoured; longer ones wait this long and are reported. [default: 120]"),
        lease_timeout_s: Optional[float] = typer.Option(None, "--lease-timeout-s", help="Another job's lease on --output is stale after this long without a heartbeat. [default: 120]"),
        price_table: Optional[str] = typer.Option(None, "--price-table", help="YAML price table."),
        price_input: Optional[float] = typer.Option(None, "--price-input", help="Input price override, USD per 1K tokens."),
        price_output: Optional[float] = typer.Option(None, "--price-output", help="Output price override, USD per 1K tokens."),
        progress_interval_s: Optional[float] = typer.Option(None, "--progress-interval-s", help="Seconds between progress lines. [default: 5]"),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address (default: RAY_ADDRESS or local)."),
        ray_num_cpus: Optional[int] = typer.Option(None, "--ray-num-cpus", help="CPUs for a local Ray started by this job."),
        api: Optional[str] = typer.Option(None, "--api", help="online | batch (the provider's Batch API at its batch price; resumable across days). [default: online]"),
        cancel: bool = typer.Option(False, "--cancel", help="Batch mode: cancel the batches this output has in flight."),
        batch_max_requests: Optional[int] = typer.Option(None, "--batch-max-requests", help="Requests per batch file. [default: 50000]"),
        batch_max_bytes: Optional[int] = typer.Option(None, "--batch-max-bytes", help="Bytes per batch file. [default: 200 MB]"),
        batch_max_in_flight: Optional[int] = typer.Option(None, "--batch-max-in-flight", help="Batches running at once. [default: 20]"),
        batch_poll_s: Optional[float] = typer.Option(None, "--batch-poll-s", help="Seconds between batch polls. [default: 30]"),
        batch_max_submissions: Optional[int] = typer.Option(None, "--batch-max-submissions", help="Submissions of a request before it is a failure. [default: 3]"),
    ) -> None:
        """Generate GSM8K-AI-SubQ rows (QG -> QA -> feedback -> rewards) with Ray Data over rate-limited teacher
        actors; resumable (durable request cache), exactly one row per problem, failures recorded. Prints
        progress to stderr and the summary JSON as the last stdout line."""
        from pipelines.generate import GenerateConfig, run_generate
        from subq.config import load_config

        overrides = dict(input=input, output=output, model=model, base_url=base_url, api_key_env=api_key_env,
                         template=template, n_sets=n_sets, n_feedback=n_feedback, temperature=temperature,
                         max_tokens=max_tokens, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency, actors=actors,
                         batch_size=batch_size, limit=limit, max_cost_usd=max_cost_usd,
                         dry_run=dry_run or None, retry_failed=retry_failed or None, max_retries=max_retries,
                         timeout_s=timeout_s, max_retry_after_s=max_retry_after_s, lease_timeout_s=lease_timeout_s,
                         price_table=price_table, price_input_per_1k=price_input,
                         price_output_per_1k=price_output, progress_interval_s=progress_interval_s,
                         ray_address=ray_address, ray_num_cpus=ray_num_cpus, api=api, cancel=cancel or None,
                         batch_max_requests=batch_max_requests, batch_max_bytes=batch_max_bytes,
                         batch_max_in_flight=batch_max_in_flight, batch_poll_s=batch_poll_s,
                         batch_max_submissions=batch_max_submissions)
        cfg = load_config(GenerateConfig, config, overrides)
        from subq import console

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
        timeout_rate: float = typer.Option(0.0, "--timeout-rate", help="Share that hang, then 504."),
        timeout_hang_s: float = typer.Option(30.0, "--timeout-hang-s", help="How long a 'timeout' hangs."),
        require_key_env: Optional[str] = typer.Option(None, "--require-key-env", help="Require the key held in this env var (401 otherwise)."),
        model: Optional[list[str]] = typer.Option(None, "--model", help="Repeatable: serve only these model names (404 otherwise)."),
        seed: int = typer.Option(0, "--seed", help="RNG seed for faults and latency."),
        batch_api: bool = typer.Option(True, "--batch-api/--no-batch-api", help="Serve the Batch API (/v1/files, /v1/batches)."),
        batch_delay_s: float = typer.Option(1.0, "--batch-delay-s", help="Processing time of one batch."),
        batch_error_rate: float = typer.Option(0.0, "--batch-error-rate", help="Share of batch requests answered with a per-request 500."),
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

        for name, v in (("--fail-rate", fail_rate), ("--malformed-rate", malformed_rate), ("--timeout-rate", timeout_rate)):
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
                                  malformed_rate=malformed_rate, timeout_rate=timeout_rate,
                                  timeout_hang_s=timeout_hang_s, api_key=key, models=model or None, seed=seed,
                                  batch_api=batch_api, batch_delay_s=batch_delay_s, batch_error_rate=batch_error_rate,
                                  batch_expire_first=batch_expire_first, batch_bad_output_first=batch_bad_output_first,
                                  batch_bad_output=batch_bad_output, batch_upload_fail_first=batch_upload_fail_first))
