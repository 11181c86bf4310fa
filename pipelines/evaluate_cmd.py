"""`subq eval`: evaluate decomposer x solver pairs (pipelines.evaluate). Its flags derive from EvalConfig (the
nested solver and decomposer settings flattened: `--solver-base-url`, `--decomposer-beta`); today's names are
declared aliases (`--decomposer` for each entry of `decomposers`, `--solver-model`, `--beta`, ...).

    subq eval --data gsm8k:test --limit 100 --decomposer none --decomposer teacher --decomposer bc=ckpt/bc \\
        --solver-base-url http://127.0.0.1:8100/v1 --out reports/eval1
    ray job submit --working-dir . -- python -m pipelines.evaluate --data gsm8k:test --limit 100 \\
        --decomposer teacher --solver-base-url http://HOST:8100/v1 --out reports/eval1
"""

from __future__ import annotations

from typing import Optional

import typer

from subq.errors import ConfigError


def register(app: typer.Typer) -> None:
    from pipelines.evaluate_config import EvalConfig
    from subq.cli_options import config_command
    from subq.config import merge_values, validate_values
    from subq.settings import FLAG_ALIASES

    @app.command("eval")
    @config_command(EvalConfig, flatten=("decomposer", "solver"), repeat=("decomposers",),
                    aliases={**FLAG_ALIASES, "decomposers": ["--decomposer"]})
    def eval_cmd(config: Optional[str], overrides: dict) -> None:
        """Evaluate decomposer x solver pairs over a split (Ray Data) and write a report directory: results.json,
        report.md, accuracy_vs_cost.png, subquestions_hist.png and one paper_raw jsonl per pair."""
        from pipelines.evaluate import run_eval
        from subq.config import read_yaml

        values = merge_values(read_yaml(config) if config else {}, overrides)
        if not values.get("out"):
            raise ConfigError("a report directory is required", field="--out")
        cfg = validate_values(EvalConfig, values, config)
        from subq import console

        console.activate("eval")
        result = run_eval(cfg, progress=console.echo)
        console.emit_json({"out": result["out"], "files": sorted(result["files"]), "offline": result["offline"],
                          "runs": [{"decomposer": r["decomposer"], "solver": r["solver"],
                                    "accuracy": {m: v["accuracy"] for m, v in r["summary"]["accuracy"].items()},
                                    "cost_usd": r["summary"]["usage"]["total"]["cost_usd"],
                                    "errors": r["summary"]["errors"]} for r in result["runs"]]})
