"""Build, start and stop the app (`build_app`, `app_builder` for `serve deploy`, `start_serve`, `stop_serve`)."""

import time
from typing import Any, Optional

from ray import serve

from pipelines.serve.config import Quotas, ServeConfig
from pipelines.serve.deployments import DecomposerDeployment, SolverDeployment
from pipelines.serve.ingress import Ingress
from pipelines.serve_auth import (
    bound_hosts,
    check_exposure,
    load_key_entries,
)
from subq import storage
from subq.errors import SubqError


def api_key_entries(cfg: ServeConfig) -> list[dict]:
    """The configured keys as the Ingress gets them (digest, id, name, admin, quotas; never the key), after the
    exposure rule: a non-loopback bind needs keys or insecure, checked on the config's host and on the address the
    running Serve proxy really binds (`serve deploy`, `serve run`, KubeRay build the app where that proxy runs)."""
    entries = load_key_entries(cfg.api_keys_env, cfg.api_keys_file)
    for e in entries:
        if e.quotas:
            Quotas(**e.quotas)  # the key file's quotas: the same fields and bounds as ServeConfig.quotas
    check_exposure(bound_hosts(cfg.host), len(entries), cfg.insecure)
    return [e.public() for e in entries]


def api_key_digests(cfg: ServeConfig) -> list[str]:
    """SHA-256 digests of the configured API keys, after the exposure rule."""
    return [e["digest"] for e in api_key_entries(cfg)]


def build_app(config: ServeConfig):
    """The Serve application (Ingress bound to the Decomposer and Solver deployments) for `config`. API keys are
    read here (env/file) and only their digests reach the Ingress; the results root is made absolute here."""
    cfg = config if isinstance(config, ServeConfig) else ServeConfig(**config)
    cfg.solver.price()  # an unpriced solver model is a ConfigError now, not a wrong $ later
    keys = api_key_entries(cfg)
    # local paths absolute: replicas on a joined cluster do not run in this working directory
    cfg = cfg.model_copy(update={
        "results_root": storage.absolute(cfg.results_root),
        "decomposer": cfg.decomposer.model_copy(update={"path": storage.absolute(cfg.decomposer.path)}),
        "solver": cfg.solver.model_copy(update={"cache_dir": storage.absolute(cfg.solver.cache_dir),
                                                "local_path": storage.absolute(cfg.solver.local_path)})})
    backpressure = {"status_code": 503, "retry_after_s": cfg.retry_after_s}

    def autoscaling(lo: int, hi: int) -> dict:
        return {"min_replicas": lo, "initial_replicas": max(1, lo), "max_replicas": hi,
                "target_ongoing_requests": cfg.target_ongoing_requests}

    decomposer = None
    if cfg.decomposer.path:
        decomposer = DecomposerDeployment.options(
            max_ongoing_requests=cfg.decomposer_max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
            autoscaling_config=autoscaling(cfg.decomposer_min_replicas, cfg.decomposer_max_replicas),
            ray_actor_options={"num_cpus": cfg.decomposer_num_cpus, "num_gpus": cfg.decomposer_num_gpus},
        ).bind(cfg.decomposer.model_dump(), cfg.max_batch_size, cfg.batch_wait_timeout_s,
               max(1, int(cfg.decomposer_num_cpus)), cfg.decode_temperatures, cfg.decode_betas)
    solver = SolverDeployment.options(
        max_ongoing_requests=cfg.solver_max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
        autoscaling_config=autoscaling(cfg.solver_min_replicas, cfg.solver_max_replicas),
        ray_actor_options={"num_cpus": 0},
    ).bind(cfg.solver.model_dump(), _solver_key_ref(cfg))
    return Ingress.options(
        num_replicas=1,  # evaluations live in this replica's memory
        max_ongoing_requests=cfg.ingress_max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
        backpressure_config=backpressure, ray_actor_options={"num_cpus": 0},
    ).bind(decomposer, solver, cfg.model_dump(), keys)


def _solver_key_ref(cfg: ServeConfig) -> Optional[list]:
    """[ObjectRef] of the solver key when this process is a driver that has it (`subq serve`, the demo): replicas on
    a joined cluster's workers do not have this shell's environment, so the key travels in the object store (never
    in the deployment's args, runtime_env or logs), as generation's and `subq eval`'s. None elsewhere (`serve
    deploy` builds the app in a task that ends: replicas read the cluster's environment or the shipped key)."""
    import ray

    from cluster.submit import share_key

    if cfg.solver.backend != "openai" or not ray.is_initialized() or \
            ray.get_runtime_context().worker.mode != ray.SCRIPT_MODE:
        return None
    return share_key(cfg.solver.api_key_env)


def app_builder(args: dict):
    """Entry for `serve deploy` / `serve run pipelines.serve:app_builder`: `args` are ServeConfig fields
    (nested `decomposer.*` / `solver.*` also accepted as dotted keys)."""
    nested: dict[str, Any] = {}
    for k, v in dict(args or {}).items():
        if "." in k:
            outer, inner = k.split(".", 1)
            nested.setdefault(outer, {})[inner] = v
        else:
            nested[k] = v
    from subq.config import load_config

    return build_app(load_config(ServeConfig, None, nested))


def _start_proxy(config: ServeConfig, ray_init: Optional[dict]) -> None:
    """Start Ray (if needed) and Serve's HTTP proxy on config.host:port."""
    import ray

    if not ray.is_initialized():
        from cluster.connect import init_ray
        init_ray(**(ray_init or {"include_dashboard": False}))
    serve.start(http_options={"host": config.host, "port": config.port})


def start_serve(config: ServeConfig, *, ray_init: Optional[dict] = None) -> str:
    """Start Ray (if needed) and Serve on config.host:port, deploy the app, wait until healthy; return the base URL
    (`http://host:port` + route prefix, no trailing slash)."""
    _start_proxy(config, ray_init)
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    base = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
    wait_healthy(base)
    return base


def start_serve_many(configs: list[ServeConfig], *, ray_init: Optional[dict] = None) -> list[str]:
    """Deploy several applications together (one HTTP proxy: the first config's host and port; each its own
    app_name and route_prefix), their replicas starting at the same time; wait until every one is healthy and
    return their base URLs in order."""
    from ray.serve.api import RunTarget

    _start_proxy(configs[0], ray_init)
    serve.run_many([RunTarget(target=build_app(c), name=c.app_name, route_prefix=c.route_prefix)
                    for c in configs], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    bases = [f"http://{configs[0].host}:{configs[0].port}{c.route_prefix.rstrip('/')}" for c in configs]
    for base in bases:
        wait_healthy(base)
    return bases


def wait_healthy(base: str, timeout_s: float = 120) -> None:
    """Wait until the application at `base` answers GET /healthz with 200."""
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise SubqError(f"the Serve app did not become healthy at {base}/healthz within {timeout_s:.0f} s")
        time.sleep(0.5)


def stop_serve(shutdown_ray: bool = True) -> None:
    import ray

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            if shutdown_ray:
                ray.shutdown()
