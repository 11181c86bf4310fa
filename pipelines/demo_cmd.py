"""`subq demo` (see pipelines.demo for the stages, the output directory and resume). Heavy imports stay inside."""

from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        config: Optional[str] = typer.Option(None, "--config", help="YAML file with any DemoConfig fields; flags override it."),
        out: Optional[str] = typer.Option(None, "--out", help="Output directory; re-run the same command to resume. [default: subq-demo]"),
        input: Optional[str] = typer.Option(None, "--input", help="Problems: first --problems generated, next --eval-problems held out. [default: gsm8k:test]"),
        problems: Optional[int] = typer.Option(None, "--problems", help="Problems to generate rows for (training set). [default: 48]"),
        eval_problems: Optional[int] = typer.Option(None, "--eval-problems", help="Held-out problems evaluated through the endpoint. [default: 16]"),
        base_url: Optional[str] = typer.Option(None, "--base-url", help="Real OpenAI-compatible teacher endpoint (key in --api-key-env). [default: local replay server]"),
        teacher_model: Optional[str] = typer.Option(None, "--teacher-model", help="Teacher model. [default: gpt-3.5-turbo]"),
        api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="NAME of the env var holding the key. [default: OPENAI_API_KEY]"),
        solver_model: Optional[str] = typer.Option(None, "--solver-model", help="Solver model. [default: the teacher model]"),
        solver_base_url: Optional[str] = typer.Option(None, "--solver-base-url", help="Solver endpoint. [default: the teacher's]"),
        n_sets: Optional[int] = typer.Option(None, "--n-sets", help="Sub-question sets per problem. [default: 3]"),
        n_feedback: Optional[int] = typer.Option(None, "--n-feedback", help="Feedback calls per set. [default: 3]"),
        rpm: Optional[float] = typer.Option(None, "--rpm", help="Teacher requests/minute, cluster-wide. [default: 1500]"),
        tpm: Optional[float] = typer.Option(None, "--tpm", help="Teacher tokens/minute, cluster-wide."),
        actors: Optional[str] = typer.Option(None, "--actors", help="Teacher actor pool MIN,MAX. [default: 2,2]"),
        max_cost_usd: Optional[float] = typer.Option(None, "--max-cost-usd", help="Stop generation cleanly after this spend."),
        teacher_latency_s: Optional[float] = typer.Option(None, "--teacher-latency-s", help="Replay server mean latency. [default: 0.1]"),
        model: Optional[str] = typer.Option(None, "--model", help="Base decomposer (HF causal LM dir). [default: a tiny GPT-2 from `subq init-model`]"),
        algos: Optional[str] = typer.Option(None, "--algos", help="Comma list of bc, filtered_bc, ilql. [default: bc,filtered_bc]"),
        ilql_rewards: Optional[str] = typer.Option(None, "--ilql-rewards", help="sparse | dense. [default: dense]"),
        steps: Optional[int] = typer.Option(None, "--steps", help="BC optimizer steps (FBC/ILQL: half). [default: 150]"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Micro batch per training worker. [default: 8]"),
        lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate. [default: 1e-3]"),
        num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Ray Train workers. [default: 2]"),
        use_gpu: Optional[bool] = typer.Option(None, "--use-gpu/--no-use-gpu", help="Train and serve on GPUs."),
        deepspeed: Optional[str] = typer.Option(None, "--deepspeed", help="zero0..zero3 or a DeepSpeed JSON path. [default: zero2]"),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Decomposer tokens per decomposition. [default: 64]"),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster. [default: RAY_ADDRESS, else a local one]"),
        port: Optional[int] = typer.Option(None, "--port", help="Serve HTTP port on 127.0.0.1 (0: free). [default: 0]"),
    ) -> None:
        """The whole loop end to end on a local Ray: replay teacher -> generate GSM8K-AI-SubQ through rate-limited
        teacher actors -> tiny GPT-2 -> BC then Filtered BC (ILQL with --algos) -> Ray Serve decomposer + solver ->
        evaluation through the endpoint -> OUT/report.md (+ PNGs, JSON). Offline and keyless by default;
        --base-url and a real --model make it the real run. Ctrl-C stops cleanly; re-run to resume."""
        import sys

        from pipelines.demo import DemoConfig, Stopped, run_demo
        from subq.config import load_config

        overrides = dict(out=out, input=input, problems=problems, eval_problems=eval_problems, base_url=base_url,
                         teacher_model=teacher_model, api_key_env=api_key_env, solver_model=solver_model,
                         solver_base_url=solver_base_url, n_sets=n_sets, n_feedback=n_feedback, rpm=rpm, tpm=tpm,
                         actors=actors, max_cost_usd=max_cost_usd, teacher_latency_s=teacher_latency_s, model=model,
                         algos=algos, ilql_rewards=ilql_rewards, steps=steps, batch_size=batch_size, lr=lr,
                         num_workers=num_workers, use_gpu=use_gpu, deepspeed=deepspeed, max_new_tokens=max_new_tokens,
                         ray_address=ray_address, port=port)
        cfg = load_config(DemoConfig, config, overrides)
        from subq import console

        console.activate("demo")
        try:
            run_demo(cfg)
        except Stopped as e:
            console.echo(f"\n{e}")
            sys.exit(130)
