"""`subq demo` (see pipelines.demo for the stages, the output directory and resume). Its options are derived from
pipelines.demo.DemoConfig (subq.cli_options): one definition for the flags, the YAML `--config` and
`python -m pipelines.demo`. Heavy imports stay inside the command."""

from __future__ import annotations

from typing import Optional

import typer

from subq.cli_options import config_command


def _demo_config():
    from pipelines.demo import DemoConfig

    return DemoConfig


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @config_command(_demo_config())
    def demo(config_path: Optional[str], overrides: dict) -> None:
        """The whole loop end to end on a local Ray: replay teacher -> generate GSM8K-AI-SubQ through rate-limited
        teacher actors -> tiny GPT-2 -> BC, Filtered BC and ILQL (Ray Train + DeepSpeed) -> Ray Serve decomposer +
        solver -> evaluation through the endpoint -> OUT/report.md (+ PNGs, JSON). Offline and keyless by default;
        --base-url and a real --model make it the real run. Ctrl-C stops cleanly; re-run to resume."""
        import sys

        from pipelines.demo import DemoConfig, Stopped, run_demo
        from subq import console
        from subq.config import load_config

        cfg = load_config(DemoConfig, config_path, overrides)
        console.activate("demo")
        try:
            run_demo(cfg)
        except Stopped as e:
            console.echo(f"\n{e}")
            sys.exit(130)
