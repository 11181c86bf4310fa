"""`subq generate` (see pipelines.generate for the command and the output layout). Ray, FastAPI and the openai SDK are imported inside the commands so `subq --help` is fast."""

from __future__ import annotations

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
