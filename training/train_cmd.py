"""`subq train` and `subq init-model` (registered into subq.cli). Heavy imports stay inside the commands."""

from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("init-model")
    def init_model(
        out: str = typer.Argument(..., help="Directory to write the model + tokenizer (HF format)."),
        layers: int = typer.Option(2, "--layers", help="Transformer layers."),
        width: int = typer.Option(64, "--width", help="Hidden size (n_embd); divisible by --heads."),
        heads: int = typer.Option(2, "--heads", help="Attention heads."),
        vocab_size: int = typer.Option(2048, "--vocab-size", help="Byte-level BPE vocabulary size (>= 300)."),
        seed: int = typer.Option(0, "--seed", help="Weight-init seed."),
    ) -> None:
        """Create a tiny random-init GPT-2 with a byte-level BPE tokenizer trained locally on GSM8K (offline
        stand-in for `gpt2`); loads with AutoModelForCausalLM / AutoTokenizer."""
        from training.init_model import create_tiny_model

        print(create_tiny_model(out, n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab_size, seed=seed))
