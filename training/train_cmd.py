"""`subq train` and `subq init-model` (registered by the front door, pipelines/cli.py). Heavy imports stay inside the commands.

`subq train`'s options are derived from training.config.TrainConfig (subq.cli_options): one definition for the
flags, the YAML `--config` and `python -m training.train` (which runs this same command)."""

from __future__ import annotations

from typing import Optional

import typer

from subq.cli_options import config_command
from training.config import TrainConfig


def register(app: typer.Typer) -> None:
    @app.command("init-model")
    def init_model(
        out: str = typer.Argument(..., help="Directory to write the model + tokenizer (HF format)."),
        layers: int = typer.Option(2, "--layers", help="Transformer layers."),
        width: int = typer.Option(64, "--width", help="Hidden size; divisible by --heads."),
        heads: int = typer.Option(2, "--heads", help="Attention heads."),
        vocab_size: int = typer.Option(2048, "--vocab-size", help="Byte-level BPE vocabulary size (>= 300)."),
        seed: int = typer.Option(0, "--seed", help="Weight-init seed."),
        arch: str = typer.Option("gpt2", "--arch", help="gpt2 (tokenizer adds nothing) | llama (Llama architecture, tokenizer adds BOS)."),
    ) -> None:
        """Create a tiny random-init causal LM with a byte-level BPE tokenizer trained locally on GSM8K (offline
        stand-in for `gpt2`); loads with AutoModelForCausalLM / AutoTokenizer. Prints the directory."""
        from subq import console
        from training.init_model import create_tiny_model

        console.activate("init-model")  # transformers' and DeepSpeed's lines go to the run's log
        print(create_tiny_model(out, n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab_size, seed=seed,
                                arch=arch), file=console.out(), flush=True)

    @app.command("train")
    @config_command(TrainConfig, extra={
        "ray_address": (Optional[str], typer.Option(None, "--ray-address", help="Join this Ray cluster (default: the running one, else a local one).")),
    })
    def train(config_path: Optional[str], overrides: dict, ray_address: Optional[str]) -> None:
        """Train a decomposer (BC / Filtered BC / ILQL) with Ray Train + DeepSpeed; writes
        <storage-path>/<name>/final and best/ (HF format, + ILQL heads) and metrics.{json,csv,png}. Prints a
        progress line on stderr and one JSON line on stdout."""
        from subq import console
        from subq.config import load_config
        from training.train import run_train

        cfg = load_config(TrainConfig, config_path, overrides)
        console.activate("train")
        ray_init = {"address": ray_address} if ray_address else {"include_dashboard": False}
        result = run_train(cfg, ray_init=ray_init, progress=True)
        console.emit_json(result)
