"""`subq serve` and `subq eval`: the serving and evaluation commands.

    subq serve --decomposer-path ckpt/bc --solver-base-url http://127.0.0.1:8100/v1 --port 8000
    subq serve --config pipelines/serve_config.yaml        # the same file `serve deploy` takes
    subq eval --data gsm8k:test --limit 100 --decomposer none --decomposer teacher --decomposer bc=ckpt/bc \\
        --solver-base-url http://127.0.0.1:8100/v1 --out reports/eval1
    ray job submit --working-dir . -- python -m pipelines.serve --config pipelines/serve_config.yaml
    ray job submit --working-dir . -- python -m pipelines.evaluate --data gsm8k:test --limit 100 \\
        --decomposer teacher --solver-base-url http://HOST:8100/v1 --out reports/eval1
"""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from subq.errors import ConfigError


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if v is None:
            continue
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict):
            out[k] = _merge({}, v)
        else:
            out[k] = v
    return out


def serve_values_from_yaml(path: Optional[str]) -> dict:
    """ServeConfig fields from a YAML file: either a ServeConfig mapping or a Serve deploy config
    (`applications[0].args`, with `http_options.host/port`)."""
    if not path:
        return {}
    from subq.config import read_yaml

    raw = read_yaml(path)
    if "applications" in raw:
        apps = raw.get("applications") or []
        if not apps or not isinstance(apps[0], dict):
            raise ConfigError("a Serve deploy config needs one application", field="applications", source=path)
        values = dict(apps[0].get("args") or {})
        http = raw.get("http_options") or {}
        for k in ("host", "port"):
            # `serve deploy` binds http_options, whatever the args say: the exposure rule must see that address
            if k in http and k in values and str(values[k]) != str(http[k]):
                raise ConfigError(f"args.{k}={values[k]!r} but http_options.{k}={http[k]!r}: Serve's proxy binds "
                                  f"http_options; make them equal (or drop args.{k})", field=f"http_options.{k}",
                                  source=path)
            if k in http:
                values[k] = http[k]
        if "route_prefix" in apps[0] and "route_prefix" not in values:
            values["route_prefix"] = apps[0]["route_prefix"]
        if "name" in apps[0] and "app_name" not in values:
            values["app_name"] = apps[0]["name"]
        return values
    return raw


def _validate(cls, values: dict, source: Optional[str]):
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        raise ConfigError(err["msg"], field=loc, source=source) from None


def drain_serve(app_name: str) -> None:
    """Answer the requests in flight, then let Serve go: deleting the application stops its replicas the graceful
    way (each waits for its ongoing requests, up to its `graceful_shutdown_timeout_s`) while the HTTP proxy, still
    up, returns their replies; `serve.shutdown()` alone kills the proxy at once and drops them."""
    from ray import serve

    try:
        serve.delete(app_name, _blocking=True)
    except Exception as e:  # noqa: BLE001 - a failed drain must not stop the shutdown that follows
        from subq import console

        console.echo(f"warning: draining {app_name} failed ({type(e).__name__}: {e}); shutting down")


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        config: Optional[str] = typer.Option(None, "--config", help="YAML: ServeConfig fields, or a `serve deploy` config (pipelines/serve_config.yaml)."),
        host: Optional[str] = typer.Option(None, "--host", help="Bind address (default 127.0.0.1)."),
        port: Optional[int] = typer.Option(None, "--port", help="HTTP port (default 8000)."),
        decomposer_path: Optional[str] = typer.Option(None, "--decomposer-path", help="Distilled decomposer checkpoint (BC/FBC/ILQL, HF format)."),
        decomposer_name: Optional[str] = typer.Option(None, "--decomposer-name", help="Model id of the decomposer on /v1/models."),
        beta: Optional[float] = typer.Option(None, "--beta", help="ILQL guidance weight (default: the checkpoint's own ilql.beta; 0 = plain BC decoding)."),
        do_sample: Optional[bool] = typer.Option(None, "--sample/--greedy", help="Sampled or greedy decomposition."),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Max tokens per decomposition."),
        max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="@serve.batch size of the decomposer."),
        solver_model: Optional[str] = typer.Option(None, "--solver-model", help="Solver model name (price-table key)."),
        solver_base_url: Optional[str] = typer.Option(None, "--solver-base-url", help="OpenAI-compatible base URL of the solver."),
        solver_backend: Optional[str] = typer.Option(None, "--solver-backend", help="openai | local."),
        solver_local_path: Optional[str] = typer.Option(None, "--solver-local-path", help="HF checkpoint for --solver-backend local."),
        solver_prompt: Optional[str] = typer.Option(None, "--solver-prompt", help="paper (QA prompt) | doc (Divide-or-Conquer solver prompt)."),
        api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Env var holding the solver key (default OPENAI_API_KEY)."),
        price_input: Optional[float] = typer.Option(None, "--solver-price-input", help="Solver $ per 1K prompt tokens (overrides the price table)."),
        price_output: Optional[float] = typer.Option(None, "--solver-price-output", help="Solver $ per 1K completion tokens."),
        num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs for a local Ray instance (ignored when RAY_ADDRESS is set)."),
        api_keys_file: Optional[str] = typer.Option(None, "--api-keys-file", help="File of API keys clients must send (one a line); also $SUBQ_API_KEYS (comma-separated)."),
        insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without API keys (only behind an authenticating proxy)."),
        results_root: Optional[str] = typer.Option(None, "--results-root", help="Where evaluations are written (default ~/.cache/subq/serve-evaluations)."),
        check: bool = typer.Option(False, "--check", help="Validate the config, print it as JSON and exit without starting Serve."),
    ) -> None:
        """Serve the decomposer -> solver app on Ray Serve (Ctrl-C or SIGTERM stops it after answering the requests
        in flight, exit 0). Endpoints: /v1/decompose, /v1/solve,
        /v1/evaluations, /v1/chat/completions, /v1/models, /healthz."""
        from pipelines.serve import ServeConfig

        values = _merge(serve_values_from_yaml(config), {
            "host": host, "port": port, "max_batch_size": max_batch_size, "api_keys_file": api_keys_file,
            "insecure": insecure or None, "results_root": results_root,
            "decomposer": {"path": decomposer_path, "name": decomposer_name, "beta": beta, "do_sample": do_sample,
                           "max_new_tokens": max_new_tokens},
            "solver": {"name": solver_model, "base_url": solver_base_url, "backend": solver_backend,
                       "local_path": solver_local_path, "prompt": solver_prompt, "api_key_env": api_key_env,
                       "price_input_per_1k": price_input, "price_output_per_1k": price_output},
        })
        cfg = _validate(ServeConfig, values, config)
        cfg.solver.price()
        from pipelines.serve import api_key_digests

        n_keys = len(api_key_digests(cfg))  # a non-loopback host without keys stops here (unless --insecure)
        if check:
            print(json.dumps(cfg.model_dump()))
            return
        from actors.solver import check_solver

        check_solver(cfg.solver)  # the solver's key is set and its endpoint answers, or one error line now
        from subq import console as _c

        _c.echo(f"solver {cfg.solver.name} at {cfg.solver.upstream()} answers; API keys: "
                f"{n_keys or 'none (loopback only)'}")
        import os

        from pipelines.serve import start_serve, stop_serve

        from subq import console

        console.activate("serve")
        init = {"include_dashboard": False}
        if not os.environ.get("RAY_ADDRESS") and num_cpus:
            init["num_cpus"] = num_cpus
        from subq import stop

        serving = False
        try:
            base = start_serve(cfg, ray_init=init)
            console.emit_json({"status": "serving", "base_url": base, "openai_base_url": base + "/v1"})
            serving = True
            while True:
                stop.sleep(1.0)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (supervisors, Kubernetes, `ray job stop`): a clean stop
            if not serving:
                raise  # stopped while starting: exit 130/143 (after the shutdown below)
            stop.while_draining()  # a second SIGTERM does not cut the drain short (a second Ctrl-C does)
            console.echo(f"stopping ({stop.describe(e)}): answering the requests in flight, then shutting down")
            drain_serve(cfg.app_name)
        finally:
            stop_serve()
        console.echo("stopped")  # exit 0: a requested stop, done cleanly

    @app.command("eval")
    def eval_cmd(
        out: Optional[str] = typer.Option(None, "--out", help="Report directory (local path or URI). Required."),
        data: Optional[str] = typer.Option(None, "--data", help="Split name (gsm8k:test) or .jsonl/.json/.parquet path/URI."),
        limit: Optional[int] = typer.Option(None, "--limit", help="First N problems only."),
        decomposer: Optional[list[str]] = typer.Option(None, "--decomposer", help="Repeatable: none | teacher | NAME=CHECKPOINT_DIR."),
        config: Optional[str] = typer.Option(None, "--config", help="YAML with EvalConfig fields (flags override it)."),
        beta: Optional[float] = typer.Option(None, "--beta", help="ILQL guidance weight for distilled decomposers (default: each checkpoint's own ilql.beta)."),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Max tokens per decomposition."),
        solver_model: Optional[str] = typer.Option(None, "--solver-model", help="Solver model name (price-table key)."),
        solver_base_url: Optional[str] = typer.Option(None, "--solver-base-url", help="OpenAI-compatible base URL of the solver."),
        solver_backend: Optional[str] = typer.Option(None, "--solver-backend", help="openai | local."),
        solver_local_path: Optional[str] = typer.Option(None, "--solver-local-path", help="HF checkpoint for --solver-backend local."),
        solver_prompt: Optional[str] = typer.Option(None, "--solver-prompt", help="paper | doc."),
        solver_max_tokens: Optional[int] = typer.Option(None, "--solver-max-tokens", help="Max completion tokens per solver call."),
        api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Env var holding the solver key."),
        price_input: Optional[float] = typer.Option(None, "--solver-price-input", help="Solver $ per 1K prompt tokens (overrides the price table)."),
        price_output: Optional[float] = typer.Option(None, "--solver-price-output", help="Solver $ per 1K completion tokens."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Problems per Ray Data batch."),
        concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Solver calls in flight per actor."),
        cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Durable cache of solver replies (default OUT/cache): a re-run pays nothing."),
        decomposer_num_gpus: Optional[float] = typer.Option(None, "--decomposer-num-gpus", help="GPUs each distilled-decomposer actor reserves (its model then runs on cuda)."),
        exclude_few_shot: bool = typer.Option(False, "--exclude-few-shot", help="Drop the GSM8K test problems the paper's prompts quote as few-shot examples (default: kept, marked, and the report also gives accuracy without them)."),
    ) -> None:
        """Evaluate decomposer x solver pairs over a split (Ray Data) and write a report directory: results.json,
        report.md, accuracy_vs_cost.png, subquestions_hist.png and one paper_raw jsonl per pair."""
        from pipelines.evaluate import EvalConfig, run_eval
        from subq.config import read_yaml

        values = _merge(read_yaml(config) if config else {}, {
            "out": out, "data": data, "limit": limit, "decomposers": list(decomposer) if decomposer else None,
            "batch_size": batch_size, "concurrency": concurrency, "cache_dir": cache_dir,
            "decomposer_num_gpus": decomposer_num_gpus,
            "exclude_few_shot": exclude_few_shot or None,
            "decomposer": {"beta": beta, "max_new_tokens": max_new_tokens},
            "solver": {"name": solver_model, "base_url": solver_base_url, "backend": solver_backend,
                       "local_path": solver_local_path, "prompt": solver_prompt, "max_tokens": solver_max_tokens,
                       "api_key_env": api_key_env, "price_input_per_1k": price_input, "price_output_per_1k": price_output},
        })
        if not values.get("out"):
            raise ConfigError("a report directory is required", field="--out")
        cfg = _validate(EvalConfig, values, config)
        from subq import console

        console.activate("eval")
        result = run_eval(cfg, progress=console.echo)
        console.emit_json({"out": result["out"], "files": sorted(result["files"]), "offline": result["offline"],
                          "runs": [{"decomposer": r["decomposer"], "solver": r["solver"],
                                    "accuracy": {m: v["accuracy"] for m, v in r["summary"]["accuracy"].items()},
                                    "cost_usd": r["summary"]["usage"]["total"]["cost_usd"],
                                    "errors": r["summary"]["errors"]} for r in result["runs"]]})
