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

    @app.command("train")
    def train(
        config: Optional[str] = typer.Option(None, "--config", help="YAML file of training.config.TrainConfig fields; flags override it."),
        algo: Optional[str] = typer.Option(None, "--algo", help="bc | filtered_bc | ilql."),
        rewards: Optional[str] = typer.Option(None, "--rewards", help="ILQL rewards: sparse (correctness on the final token) | dense (+ usefulness per sub-question)."),
        data: Optional[str] = typer.Option(None, "--data", help="Training rows: subq Parquet (file/dir/URI) or the paper's json (e.g. qg_train_dataset.jsonl)."),
        val_data: Optional[str] = typer.Option(None, "--val-data", help="Validation rows; default: hold out --val-fraction of --data."),
        val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of problems held out for validation (paper: 0.01)."),
        model: Optional[str] = typer.Option(None, "--model", help="Base HF causal LM directory (e.g. from `subq init-model`)."),
        init_from: Optional[str] = typer.Option(None, "--init-from", help="Start from this checkpoint (a BC run's final/), as the paper does for FBC/ILQL."),
        text_format: Optional[str] = typer.Option(None, "--text-format", help="paper | qlines (subq.textformat)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Micro batch per worker."),
        grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro batches per optimizer step."),
        lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate (paper: 1e-4)."),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Max tokens per example."),
        num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Ray Train workers."),
        use_gpu: Optional[bool] = typer.Option(None, "--use-gpu/--no-use-gpu", help="GPU per worker, NCCL, bf16 (per the DeepSpeed config)."),
        deepspeed: Optional[str] = typer.Option(None, "--deepspeed", help="zero0 | zero1 | zero2 | zero3 or a DeepSpeed JSON config path."),
        storage_path: Optional[str] = typer.Option(None, "--storage-path", help="Local dir or pyarrow URI; outputs in <storage-path>/<name>/."),
        name: Optional[str] = typer.Option(None, "--name", help="Run name."),
        resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue <storage-path>/<name> from its latest checkpoint."),
        checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints."),
        max_failures: Optional[int] = typer.Option(None, "--max-failures", help="Worker failures to recover from (Ray Train FailureConfig)."),
        eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Steps between validations (0: at the end only)."),
        eval_problems: Optional[int] = typer.Option(None, "--eval-problems", help="Validation problems decoded for BLEU / #sub-questions."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed."),
        ilql: Optional[list[str]] = typer.Option(None, "--ilql", help="Repeatable ILQL override KEY=VALUE (gamma, tau, cql_weight, polyak, beta, ...)."),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster (default: the running one, else a local one)."),
    ) -> None:
        """Train a decomposer (BC / Filtered BC / ILQL) with Ray Train + DeepSpeed; writes
        <storage-path>/<name>/final (HF format, + ILQL heads) and metrics.{json,csv,png}. Prints one JSON line."""
        import json

        import yaml

        from subq.config import load_config, read_yaml
        from subq.errors import ConfigError
        from training.config import TrainConfig
        from training.train import run_train

        overrides = {k: v for k, v in dict(
            algo=algo, rewards=rewards, data=data, val_data=val_data, val_fraction=val_fraction, model=model,
            init_from=init_from, text_format=text_format, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
            lr=lr, max_length=max_length, num_workers=num_workers, use_gpu=use_gpu, deepspeed=deepspeed,
            storage_path=storage_path, name=name, resume=resume, checkpoint_every=checkpoint_every,
            max_failures=max_failures, eval_every=eval_every, eval_problems=eval_problems, seed=seed).items()
            if v is not None}
        if ilql:
            base = dict((read_yaml(config).get("ilql") or {}) if config else {})
            for item in ilql:
                if "=" not in item:
                    raise ConfigError(f"expected KEY=VALUE, got {item!r}", field="--ilql")
                k, v = item.split("=", 1)
                base[k.strip()] = yaml.safe_load(v)
            overrides["ilql"] = base
        cfg = load_config(TrainConfig, config, overrides)
        from subq import console

        console.activate("train")
        ray_init = {"address": ray_address} if ray_address else {"include_dashboard": False}
        result = run_train(cfg, ray_init=ray_init)
        console.emit_json(result)
