"""`subq serve`: the serving command (its flags derive from ServeConfig; the nested solver and decomposer settings
and the per-key quotas are flattened: `--solver-base-url`, `--decomposer-path`, `--quotas-usd-per-day`).

    subq serve --decomposer-path ckpt/bc --solver-base-url http://127.0.0.1:8100/v1 --port 8000
    subq serve --config pipelines/serve_config.yaml        # the same file `serve deploy` takes
    ray job submit --working-dir . -- python -m pipelines.serve --config pipelines/serve_config.yaml
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from subq.errors import ConfigError


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
    from pipelines.serve.config import ServeConfig
    from subq.cli_options import config_command
    from subq.config import merge_values, validate_values
    from subq.settings import FLAG_ALIASES

    @app.command("serve")
    @config_command(
        ServeConfig, flatten=("decomposer", "solver", "quotas"),
        aliases={**FLAG_ALIASES, "decomposer.do_sample": ["--sample/--greedy"]},
        read_config=serve_values_from_yaml,
        config_help="YAML: ServeConfig fields, or a `serve deploy` config (pipelines/serve_config.yaml: "
                    "applications[0].args, http_options); flags override it.",
        extra={
            "num_cpus": (Optional[int], typer.Option(None, "--num-cpus", help="CPUs for a local Ray instance "
                                                     "(ignored when RAY_ADDRESS is set).", show_default=False)),
            "check": (bool, typer.Option(False, "--check", help="Validate the config, print it as JSON and exit "
                                         "without starting Serve.")),
        })
    def serve_cmd(config: Optional[str], overrides: dict, num_cpus: Optional[int], check: bool) -> None:
        """Serve the decomposer -> solver app on Ray Serve (Ctrl-C or SIGTERM stops it after answering the requests
        in flight, exit 0). Endpoints: /v1/decompose, /v1/solve,
        /v1/evaluations, /v1/chat/completions, /v1/models, /healthz."""
        cfg = validate_values(ServeConfig, merge_values(serve_values_from_yaml(config), overrides), config)
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
