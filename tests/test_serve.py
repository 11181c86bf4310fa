"""The Serve app end to end over real HTTP on 127.0.0.1: a tiny local decomposer (training.init_model +
training.decomposer) and the teacher server (pipelines.teacher_server, replaying the released ChatGPT replies) as
the solver's OpenAI-compatible upstream. One Serve instance for the module; three applications on it:
`/` (the app under test), `/dead` (solver upstream on a closed port: 502) and `/busy` (one ingress slot: 503)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

MODEL_NAME = "gpt-3.5-turbo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_eval(client: httpx.Client, eid: str, timeout: float = 240, prefix: str = "") -> dict:
    deadline = time.time() + timeout
    while True:
        v = client.get(f"{prefix}/v1/evaluations/{eid}").json()
        if v["status"] != "running" or time.time() > deadline:
            return v
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import ray
    from ray import serve

    from pipelines.serve import ServeConfig, build_app, start_serve, stop_serve
    from pipelines.teacher_server import TeacherServer

    tmp = tmp_path_factory.mktemp("serve")
    from training.init_model import create_tiny_model

    model_dir = str(tmp / "tiny")
    create_tiny_model(model_dir, n_layer=2, n_embd=64)
    os.environ["SUBQ_TEST_SOLVER_KEY"] = "local-test-key"  # the local teacher server accepts any key
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False)
    with TeacherServer() as teacher, TeacherServer(latency_s=1.5) as slow:
        port = free_port()
        solver = {"name": MODEL_NAME, "base_url": teacher.base_url, "api_key_env": "SUBQ_TEST_SOLVER_KEY", "max_retries": 1, "timeout_s": 30}
        cfg = ServeConfig(port=port, decomposer={"path": model_dir, "max_new_tokens": 32}, solver=solver,
                          decomposer_num_cpus=0.5, max_request_bytes=64 * 1024, max_problem_chars=2000)
        base = start_serve(cfg, ray_init={})
        dead_port = free_port()  # nothing listens there
        dead = ServeConfig(port=port, app_name="dead", route_prefix="/dead",
                           solver={**solver, "base_url": f"http://127.0.0.1:{dead_port}/v1", "max_retries": 1})
        serve.run(build_app(dead), name="dead", route_prefix="/dead", blocking=False)
        busy = ServeConfig(port=port, app_name="busy", route_prefix="/busy", solver={**solver, "base_url": slow.base_url},
                           ingress_max_ongoing_requests=1, max_queued_requests=1, retry_after_s=2)
        serve.run(build_app(busy), name="busy", route_prefix="/busy", blocking=False)
        for prefix in ("/dead", "/busy"):
            for _ in range(120):
                try:
                    if httpx.get(f"{base}{prefix}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        try:
            yield {"base": base, "model_dir": model_dir, "teacher": teacher, "dead_upstream": f"127.0.0.1:{dead_port}"}
        finally:
            stop_serve()


@pytest.fixture(scope="module")
def client(stack):
    with httpx.Client(base_url=stack["base"], timeout=120) as c:
        yield c


def test_healthz_and_models(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["decomposer"] == "subq-decomposer" and h["solver"] == MODEL_NAME
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["subq-decomposer"]


def test_decompose_returns_generation_and_usage(client):
    r = client.post("/v1/decompose", json={"problem": "Tom has 3 apples and buys 2 more. How many apples?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "subq-decomposer" and isinstance(body["sub_questions"], list)
    assert body["usage"]["prompt_tokens"] > 0 and 0 < body["usage"]["completion_tokens"] <= 32


def test_solve_two_stage_with_distilled_decomposer(client):
    from subq.problems import load_problems

    p = load_problems("gsm8k:test", 1)[0]
    r = client.post("/v1/solve", json={"problem": p.problem, "decomposer": "distilled", "gold_answer": p.gold_answer})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["mode"] == "two_stage" and b["decomposer"] == "subq-decomposer" and b["solver"] == MODEL_NAME
    assert isinstance(b["sub_questions"], list) and isinstance(b["answer_text"], str) and b["answer_text"]
    assert b["usage"]["decompose"]["completion_tokens"] > 0 and b["usage"]["solve"]["prompt_tokens"] > 0
    assert b["usage"]["total"]["prompt_tokens"] == b["usage"]["decompose"]["prompt_tokens"] + b["usage"]["solve"]["prompt_tokens"]
    assert set(b["scores"]) == {"paper", "strict", "flexible"}
    assert b["latency_s"]["total"] >= b["latency_s"]["solve"] > 0


def test_solve_with_teacher_decomposition_gives_subquestions_answers_final(client):
    from subq.problems import load_problems

    p = load_problems("gsm8k-ai-subq:test", 1)[0]
    b = client.post("/v1/solve", json={"problem": p.problem, "decomposer": "teacher", "gold_answer": p.gold_answer}).json()
    assert len(b["sub_questions"]) >= 2 and all(q.strip() for q in b["sub_questions"])
    assert len(b["answers"]) >= 1 and b["final_answer"] is not None
    assert b["usage"]["decompose"]["model"] == MODEL_NAME and b["usage"]["decompose"]["cost_usd"] > 0
    assert b["usage"]["solve"]["cost_usd"] > 0
    single = client.post("/v1/solve", json={"problem": p.problem, "decomposer": "none"}).json()
    assert single["mode"] == "single_stage" and single["sub_questions"] == [] and single["usage"]["decompose"] is None


def test_openai_sdk_chats_with_served_decomposer(stack):
    import openai

    oc = openai.OpenAI(base_url=stack["base"] + "/v1", api_key="unused", max_retries=0)
    assert "subq-decomposer" in [m.id for m in oc.models.list().data]
    res = oc.chat.completions.create(
        model="subq-decomposer", max_tokens=16,
        messages=[{"role": "user", "content": "Problem: A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts?"}])
    assert res.choices[0].message.role == "assistant" and isinstance(res.choices[0].message.content, str)
    assert res.model == "subq-decomposer" and 0 < res.usage.completion_tokens <= 16 and res.usage.prompt_tokens > 0
    with pytest.raises(openai.NotFoundError, match="model"):
        oc.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("decomposer,dataset", [("distilled", "gsm8k:test"),
                                                ("teacher", "gsm8k-ai-subq:test")])
def test_evaluation_20_problems_matches_subq_score(client, tmp_path, subq_bin, decomposer, dataset):
    r = client.post("/v1/evaluations", json={"dataset": dataset, "decomposer": decomposer, "limit": 20,
                                             "out": str(tmp_path / "report")})
    assert r.status_code == 202, r.text
    v = wait_eval(client, r.json()["id"])
    assert v["status"] == "completed" and v["done"] == v["total"] == 20, v
    full = client.get(f"/v1/evaluations/{v['id']}", params={"items": "true"}).json()
    assert len(full["items"]) == 20 and all(set(it["scores"]) == {"paper", "strict", "flexible"} for it in full["items"])
    raw = tmp_path / "eval.paper_raw.jsonl"
    raw.write_text(client.get(f"/v1/evaluations/{v['id']}/paper_raw").text)
    for mode in ("paper", "strict", "flexible"):
        out = subprocess.run([subq_bin, "score", str(raw), "--mode", mode], capture_output=True, text=True, check=True)
        scored = json.loads(out.stdout)
        acc = v["summary"]["accuracy"][mode]
        assert scored["n"] == acc["n"] == 20 and scored["correct"] == acc["correct"], (mode, scored, acc)
    assert v["accuracy"] == v["summary"]["accuracy"]["paper"]["accuracy"]
    assert v["summary"]["usage"]["solve"]["calls"] >= 20
    if decomposer == "teacher":
        assert v["summary"]["accuracy"]["paper"]["correct"] > 0
        assert v["summary"]["usage"]["decompose"]["cost_usd"] > 0
    assert (tmp_path / "report" / "results.json").is_file() and (tmp_path / "report" / "report.md").is_file()


# ------------------------------------------------------------------ error cases, each over HTTP


def test_malformed_json_is_400_naming_body(client):
    r = client.post("/v1/solve", content=b'{"problem": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "body" and "JSON" in r.json()["error"]["message"]


def test_wrong_type_and_unknown_field_are_422_naming_them(client):
    r = client.post("/v1/solve", json={"problem": 5})
    assert r.status_code == 422 and r.json()["error"]["field"] == "problem"
    r = client.post("/v1/solve", json={"problem": "ok?", "temprature": 1})
    assert r.status_code == 422 and r.json()["error"]["field"] == "temprature"
    r = client.post("/v1/evaluations", json={"decomposer": "none", "limit": 0})
    assert r.status_code == 422 and r.json()["error"]["field"] == "limit"


def test_oversized_body_is_413_and_oversized_field_422(client):
    r = client.post("/v1/solve", json={"problem": "x" * 100_000})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    r = client.post("/v1/solve", json={"problem": "y" * 3000})
    assert r.status_code == 422 and r.json()["error"]["field"] == "problem" and "2000" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/solve", "/v1/decompose"])
def test_empty_problem_is_422(client, path):
    for problem in ("", "   \n"):
        r = client.post(path, json={"problem": problem})
        assert r.status_code == 422 and r.json()["error"]["field"] == "problem", r.text


def test_unknown_evaluation_is_404(client):
    r = client.get("/v1/evaluations/eval-doesnotexist")
    assert r.status_code == 404 and r.json()["error"]["field"] == "id"
    assert client.get("/v1/evaluations/eval-doesnotexist/paper_raw").status_code == 404


def test_bad_evaluation_source_is_422_naming_field(client):
    r = client.post("/v1/evaluations", json={"dataset": "nosuch:split", "decomposer": "none"})
    assert r.status_code == 422 and r.json()["error"]["field"].startswith("dataset")
    r = client.post("/v1/evaluations", json={"records": [{"q": "no problem key"}], "decomposer": "none"})
    assert r.status_code == 422 and r.json()["error"]["field"].startswith("records")
    r = client.post("/v1/evaluations", json={"decomposer": "none", "solver": "other-model"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "solver"


def test_uploaded_records_evaluation(client):
    recs = [{"question": "Tom has 2 apples and buys 3 more. How many apples does he have?", "answer": "#### 5"}]
    r = client.post("/v1/evaluations", json={"records": recs, "decomposer": "none", "limit": 5})
    assert r.status_code == 202
    v = wait_eval(client, r.json()["id"])
    assert v["status"] == "completed" and v["total"] == 1 and v["dataset"] == "uploaded"


def test_solver_upstream_down_is_502_naming_upstream_and_replica_survives(stack, client):
    r = client.post("/dead/v1/solve", json={"problem": "What is 2 + 3?", "decomposer": "none"})
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["type"] == "upstream_error" and stack["dead_upstream"] in err["upstream"] and stack["dead_upstream"] in err["message"]
    # the same replica keeps serving
    assert client.get("/dead/healthz").status_code == 200
    assert client.post("/dead/v1/solve", json={"problem": "What is 2 + 3?", "decomposer": "none"}).status_code == 502
    # an evaluation against the dead upstream completes with every item recorded as a solve error
    v = wait_eval(client, client.post("/dead/v1/evaluations", json={"decomposer": "none", "limit": 3}).json()["id"], prefix="/dead")
    assert v["status"] == "completed" and v["summary"]["errors_by_stage"]["solve"] == 3 and v["accuracy"] == 0.0


def test_overload_is_503_with_retry_after(stack):
    base = stack["base"] + "/busy"

    async def burst():
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/solve", json={"problem": f"What is {i} + 1?", "decomposer": "none"})
                                          for i in range(8)))

    rs = asyncio.run(burst())
    codes = [r.status_code for r in rs]
    assert 200 in codes and 503 in codes, codes
    rejected = [r for r in rs if r.status_code == 503]
    assert all(r.headers.get("retry-after") == "2" for r in rejected), [dict(r.headers) for r in rejected]
    assert httpx.get(base + "/healthz", timeout=30).status_code == 200


def test_serve_config_yaml_is_a_valid_serve_deploy_config(tmp_path, subq_bin):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve import app_builder

    raw = yaml.safe_load(open("pipelines/serve_config.yaml"))
    ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(raw)
    app = raw["applications"][0]
    assert app["import_path"] == "pipelines.serve:app_builder"
    assert app_builder(app["args"]) is not None
    r = subprocess.run([subq_bin, "serve", "--config", "pipelines/serve_config.yaml", "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["decomposer"]["path"] == "checkpoints/bc/final" and cfg["port"] == 8000
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_batch_size: 16\ndecomposer_max_ongoing_requests: 4\n")
    r = subprocess.run([subq_bin, "serve", "--config", str(bad), "--check"], capture_output=True, text=True)
    assert r.returncode == 2 and "max_batch_size" in r.stderr and "Traceback" not in r.stderr
