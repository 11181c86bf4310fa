"""Ray Serve app: a distilled decomposer next to an (expensive) solver, composed by a FastAPI ingress.

Run it:

    subq serve --decomposer-path ckpt/bc --solver-base-url http://127.0.0.1:8100/v1 --solver-model gpt-3.5-turbo
    serve deploy pipelines/serve_config.yaml             # on a running cluster (`ray start --head` first)
    serve run pipelines.serve:app_builder decomposer.path=ckpt/bc   # ad hoc, from a shell
    ray job submit --working-dir . -- python -m pipelines.serve --config pipelines/serve_config.yaml

Deployments (one application, default name `subq`):
- `Decomposer` (DecomposerDeployment): loads a BC/FBC/ILQL checkpoint with `training.decomposer.load_decomposer`
  and decodes with `generate_subquestions` (ILQL-guided with `beta`); requests are batched with `@serve.batch`
  (`max_ongoing_requests >= max_batch_size` is enforced) and the deployment autoscales.
- `Solver` (SolverDeployment): `actors.solver.Solver`: the paper QA / DoC solve prompt through any
  OpenAI-compatible endpoint (actors.teacher.TeacherClient: openai SDK, retries, cluster limiter) or a local HF model.
- `Ingress`: FastAPI. `POST /v1/decompose`, `POST /v1/solve`, `POST /v1/evaluations`, `GET /v1/evaluations/{id}`,
  `GET /v1/evaluations/{id}/paper_raw`, `GET /healthz`, OpenAI-compatible `POST /v1/chat/completions` and
  `GET /v1/models` for the locally served models; `GET /v1/evaluations`, `DELETE /v1/evaluations/{id}` (cancels).
  Errors are OpenAI's error object `{"error": {"message", "type", "param", "code"}}` (+ `upstream` for 502s);
  `stream=true` chat completions are server-sent `chat.completion.chunk` events ending with `data: [DONE]`.

Exposed to a team (pipelines.serve_auth): API keys (`Authorization: Bearer`, SHA-256 digests compared in constant
time) on every route but /healthz; a non-loopback host needs keys or `insecure`; bodies capped on bytes actually
read; every text field length-checked; non-finite numbers 400 (every validation error is OpenAI's 400
`invalid_request_error` naming `param`; no route answers 422). Evaluations name a dataset from the registry
(built-in splits + `datasets`) or carry problems inline, never a path or URI; results go under `results_root` by
evaluation id (pipelines.eval_store: items written as they finish; after an ingress restart finished evaluations
are served and running ones marked interrupted); limits on running evaluations (429 + Retry-After), items and $
per evaluation, TTL eviction; a deployment's 503/429 or the solver's 429/5xx is retried inside an evaluation, and an
item that still fails is an error, excluded from accuracy.

The package: `config.py` (ServeConfig, Quotas), `api.py` (request models, OpenAI errors, chat/SSE), `deployments.py`
(Decomposer, Solver), `evaluations.py` (an evaluation's state, what is retried), `ingress.py` (the routes), `app.py`
(build, start, stop); auth is `pipelines/serve_auth.py`, durable evaluations `pipelines/eval_store.py`.

Python API: `ServeConfig`, `build_app(config) -> Application`, `app_builder(args)` (for `serve deploy`),
`start_serve(config) -> base_url`, `stop_serve()`.
"""

import importlib

# names -> the module holding them, imported on first use (PEP 562), so `subq --help`, which reads ServeConfig
# (pipelines.serve.config: pydantic only) to derive `subq serve`'s flags, does not load Ray and FastAPI
_HOMES = {"problem_from_messages": "api", "Quotas": "config", "ServeConfig": "config",
          **{n: "app" for n in ("api_key_digests", "api_key_entries", "app_builder", "build_app", "start_serve",
                                "start_serve_many", "stop_serve", "wait_healthy")}}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'pipelines.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipelines.serve.{_HOMES[name]}"), name)
