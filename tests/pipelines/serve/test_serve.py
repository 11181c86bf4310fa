"""The Serve app end to end over real HTTP on 127.0.0.1: a tiny local decomposer (training.init_model +
training.decomposer) and the teacher server (pipelines.teacher_server, replaying the released ChatGPT replies) as
the solver's OpenAI-compatible upstream. One Serve instance for the module; four applications on it:
`/` (the app under test, API keys on), `/dead` (solver upstream on a closed port: 502), `/busy` (one ingress slot:
503; a slow solver; one running evaluation at a time) and `/flaky` (a solver upstream answering 500/503 to 30% of
calls, no retries in the solver client: the evaluation's own retries must keep accuracy honest)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import httpx
import pytest
from conftest import free_port, local_ray

pytestmark = pytest.mark.slow

MODEL_NAME = "gpt-3.5-turbo"
API_KEY = "sk-subq-test-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def wait_eval(client: httpx.Client, eid: str, timeout: float = 240, prefix: str = "") -> dict:
    deadline = time.time() + timeout
    while True:
        v = client.get(f"{prefix}/v1/evaluations/{eid}").json()
        if v["status"] != "running" or time.time() > deadline:
            return v
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from ray import serve

    from pipelines.serve import ServeConfig, build_app, start_serve, stop_serve, wait_healthy
    from pipelines.teacher_server import TeacherServer

    tmp = tmp_path_factory.mktemp("serve")
    from training.init_model import create_tiny_model

    model_dir = str(tmp / "tiny")
    create_tiny_model(model_dir, n_layer=2, n_embd=64)
    os.environ["SUBQ_TEST_SOLVER_KEY"] = "local-test-key"  # the local teacher server accepts any key
    local_ray()
    keys = tmp / "keys.txt"
    keys.write_text(f"# team keys\n{API_KEY}\nsk-other-key-xyz\n")
    heldout = tmp / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Tom has 2 apples and buys 3 more. How many apples does he have?", "answer": "#### 5"}]))
    with TeacherServer() as teacher, TeacherServer(latency_s=1.5) as slow, \
            TeacherServer(fail_rate=0.3, seed=7) as flaky_teacher:
        port = free_port()
        solver = {"name": MODEL_NAME, "base_url": teacher.base_url, "api_key_env": "SUBQ_TEST_SOLVER_KEY", "max_retries": 1, "timeout_s": 30}
        cfg = ServeConfig(port=port, decomposer={"path": model_dir, "max_new_tokens": 32}, solver=solver,
                          decomposer_num_cpus=0.5, max_request_bytes=64 * 1024, max_problem_chars=2000,
                          api_keys_env=None, api_keys_file=str(keys), datasets={"heldout": str(heldout)},
                          results_root=str(tmp / "results-main"))
        base = start_serve(cfg, ray_init={})
        dead_port = free_port()  # nothing listens there
        dead = ServeConfig(port=port, app_name="dead", route_prefix="/dead", api_keys_env=None,
                           solver={**solver, "base_url": f"http://127.0.0.1:{dead_port}/v1", "max_retries": 1},
                           results_root=str(tmp / "results-dead"))
        serve.run(build_app(dead), name="dead", route_prefix="/dead", blocking=False)
        busy = ServeConfig(port=port, app_name="busy", route_prefix="/busy", solver={**solver, "base_url": slow.base_url},
                           ingress_max_ongoing_requests=1, max_queued_requests=1, retry_after_s=2, api_keys_env=None,
                           max_running_evaluations=1, eval_retry_after_s=7, results_root=str(tmp / "results-busy"))
        serve.run(build_app(busy), name="busy", route_prefix="/busy", blocking=False)
        flaky = ServeConfig(port=port, app_name="flaky", route_prefix="/flaky", api_keys_env=None,
                            solver={**solver, "base_url": flaky_teacher.base_url, "max_retries": 0},
                            eval_retries=8, eval_retry_backoff_s=0.05, results_root=str(tmp / "results-flaky"))
        serve.run(build_app(flaky), name="flaky", route_prefix="/flaky", blocking=False)
        for prefix in ("/dead", "/busy", "/flaky"):
            wait_healthy(base + prefix, timeout_s=120)
        try:
            yield {"base": base, "model_dir": model_dir, "teacher": teacher, "dead_upstream": f"127.0.0.1:{dead_port}",
                   "slow": slow, "flaky": flaky_teacher, "tmp": tmp}
        finally:
            stop_serve()


@pytest.fixture(scope="module")
def client(stack):
    with httpx.Client(base_url=stack["base"], timeout=120, headers=AUTH) as c:
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
    assert b["decomposer"] == "subq-decomposer" and b["solver"] == MODEL_NAME
    # the random tiny model (seed 0, greedy) writes no sub-question for this problem: the solver answered alone,
    # and the reply says so. That fallback is the outcome asserted here, never taken for two-stage (the two-stage
    # path, with a student that writes well-formed sub-questions: tests/pipelines/evaluate/test_two_stage.py)
    assert b["fell_back_single_stage"] is True and b["mode"] == "single_stage" and b["sub_questions"] == []
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

    oc = openai.OpenAI(base_url=stack["base"] + "/v1", api_key=API_KEY, max_retries=0)
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
def test_evaluation_20_problems_matches_subq_score(client, stack, tmp_path, subq_bin, decomposer, dataset):
    r = client.post("/v1/evaluations", json={"dataset": dataset, "decomposer": decomposer, "limit": 20})
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
    assert v["offline"] and v["summary"]["provenance"] and all(it["provenance"] for it in full["items"])
    report = stack["tmp"] / "results-main" / v["id"] / "report"
    assert set(v["report"]) >= {"results.json", "report.md"} and (report / "results.json").is_file()
    assert "OFFLINE" in (report / "report.md").read_text()


# ------------------------------------------------------------------ error cases, each over HTTP


def test_malformed_json_is_400_naming_body(client):
    r = client.post("/v1/solve", content=b'{"problem": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body" and "JSON" in r.json()["error"]["message"]


def test_wrong_type_and_unknown_field_are_400_naming_them(client):
    r = client.post("/v1/solve", json={"problem": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "problem"
    r = client.post("/v1/solve", json={"problem": "ok?", "temprature": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temprature"
    r = client.post("/v1/evaluations", json={"decomposer": "none", "limit": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_oversized_body_is_413_and_oversized_field_400(client):
    r = client.post("/v1/solve", json={"problem": "x" * 100_000})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    r = client.post("/v1/solve", json={"problem": "y" * 3000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "problem" and "2000" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/solve", "/v1/decompose"])
def test_empty_problem_is_400(client, path):
    for problem in ("", "   \n"):
        r = client.post(path, json={"problem": problem})
        assert r.status_code == 400 and r.json()["error"]["param"] == "problem", r.text


def test_unknown_evaluation_is_404(client):
    r = client.get("/v1/evaluations/eval-doesnotexist")
    assert r.status_code == 404 and r.json()["error"]["param"] == "id"
    assert client.get("/v1/evaluations/eval-doesnotexist/paper_raw").status_code == 404


def test_bad_evaluation_source_is_400_naming_field(client):
    r = client.post("/v1/evaluations", json={"dataset": "nosuch:split", "decomposer": "none"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("dataset")
    r = client.post("/v1/evaluations", json={"records": [{"question": "x?", "answer": "#### 1"}] * 501, "decomposer": "none"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "records" and "max_inline_problems" in r.text
    r = client.post("/v1/evaluations", json={"records": [{"question": "y" * 2001, "answer": "#### 1"}], "decomposer": "none"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "records.0.question"
    r = client.post("/v1/evaluations", json={"records": [{"q": "no problem key"}], "decomposer": "none"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("records")
    r = client.post("/v1/evaluations", json={"decomposer": "none", "solver": "other-model"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "solver"


def test_uploaded_records_evaluation(client):
    recs = [{"question": "Tom has 2 apples and buys 3 more. How many apples does he have?", "answer": "#### 5"}]
    r = client.post("/v1/evaluations", json={"records": recs, "decomposer": "none", "limit": 5})
    assert r.status_code == 202
    v = wait_eval(client, r.json()["id"])
    assert v["status"] == "completed" and v["total"] == 1 and v["dataset"] == "uploaded"


def test_solver_upstream_down_is_502_and_replica_survives(stack, client):
    r = client.post("/dead/v1/solve", json={"problem": "What is 2 + 3?", "decomposer": "none"})
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    # what failed, not where (issue 27): the upstream's address is in the server log under the request id
    assert err["type"] == "upstream_error" and stack["dead_upstream"] not in r.text
    assert err["request_id"] == r.headers["x-request-id"]
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


# ------------------------------------------------------------------ exposed to a team: issue 12


def test_evaluation_dataset_is_a_registered_name_never_a_path_or_uri(stack, client):
    secret = stack["tmp"] / "secret.jsonl"
    secret.write_text(json.dumps({"question": "What is the secret? It is 42.", "answer": "#### 42"}) + "\n")
    before = {e["id"] for e in client.get("/v1/evaluations").json()["data"]}
    for ds in (str(secret), "/dev/zero", "/etc/passwd", "s3://bucket/x.jsonl", "file:///etc/hosts",
               "../secret.jsonl", "gs://b/p.parquet?endpoint_override=evil.example:80"):
        r = client.post("/v1/evaluations", json={"dataset": ds, "decomposer": "none", "limit": 1})
        assert r.status_code == 400, (ds, r.text)
        err = r.json()["error"]
        assert err["param"] == "dataset" and err["code"] == "unknown_dataset" and "heldout" in err["message"]
    r = client.post("/v1/evaluations", json={"dataset": "gsm8k:test", "decomposer": "none", "out": "s3://b/o"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "out"  # results go under the server's root only
    assert {e["id"] for e in client.get("/v1/evaluations").json()["data"]} == before  # nothing started
    assert client.get("/healthz").status_code == 200  # /dev/zero was never opened: the ingress is fine
    r = client.post("/v1/evaluations", json={"dataset": "heldout", "decomposer": "none"})  # the operator's dataset
    assert r.status_code == 202, r.text
    v = wait_eval(client, r.json()["id"])
    assert v["status"] == "completed" and v["total"] == 1 and v["dataset"] == "heldout"


def test_missing_or_wrong_key_is_401_in_openai_shape(stack):
    import openai

    base = stack["base"]
    assert httpx.get(base + "/healthz", timeout=30).status_code == 200  # the only open route
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": API_KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/solve"), ("GET", "/v1/evaluations")):
            r = httpx.request(method, base + path, headers=headers, json={"problem": "x?"}, timeout=30)
            assert r.status_code == 401, (headers, path, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    oc = openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as ei:
        oc.models.list()
    assert ei.value.code == "invalid_api_key" and ei.value.status_code == 401
    assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer sk-other-key-xyz"}, timeout=30).status_code == 200


def test_chunked_5mb_body_is_413(client):
    def chunks():
        for _ in range(80):
            yield b"x" * 65536  # 5 MiB, no Content-Length: transfer-encoding chunked

    r = client.post("/v1/solve", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["param"] == "body" and r.json()["error"]["code"] == "request_too_large"
    assert client.get("/healthz").status_code == 200


def test_non_finite_numbers_are_400_naming_the_field(client):
    r = client.post("/v1/decompose", content=b'{"problem": "What is 2+2?", "beta": NaN}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "beta", r.text
    r = client.post("/v1/decompose", content=b'{"problem": "What is 2+2?", "temperature": Infinity, "do_sample": true}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text
    r = client.post("/v1/chat/completions", content=b'{"model": "subq-decomposer", "temperature": NaN, '
                                                     b'"messages": [{"role": "user", "content": "hi"}]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text


def test_text_fields_are_length_checked(client):
    r = client.post("/v1/solve", json={"problem": "What is 2+2?", "sub_questions": ["q" * 1001]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sub_questions.0"
    r = client.post("/v1/solve", json={"problem": "What is 2+2?", "sub_questions": ["q?"] * 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sub_questions"
    r = client.post("/v1/solve", json={"problem": "What is 2+2?", "gold_answer": "9" * 2001})
    assert r.status_code == 400 and r.json()["error"]["param"] == "gold_answer"


def test_form_encoded_body_from_curl_d_is_read_as_json(client, stack):
    # `curl -d '{...}'` sends application/x-www-form-urlencoded (issue 10, defect 1)
    body = b'{"problem": "Tom has 3 apples and buys 2 more. How many apples?", "decomposer": "none"}'
    r = client.post("/v1/solve", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert r.json()["answer_text"]


def test_solve_and_evaluation_items_carry_the_replay_provenance(client):
    from subq.problems import load_problems

    p = load_problems("gsm8k-ai-subq:test", 1)[0]
    r = client.post("/v1/solve", json={"problem": p.problem, "decomposer": "none"})
    assert r.status_code == 200 and r.headers["x-subq-provenance"] in ("replay", "synthetic")
    assert r.json()["provenance"] == r.headers["x-subq-provenance"]


def test_openai_client_streams_a_chat_completion(stack):
    import openai

    oc = openai.OpenAI(base_url=stack["base"] + "/v1", api_key=API_KEY, max_retries=0)
    stream = oc.chat.completions.create(model="subq-decomposer", max_tokens=16, stream=True,
                                        stream_options={"include_usage": True},
                                        messages=[{"role": "user", "content": "Problem: Tom has 3 apples. How many?"}])
    chunks = list(stream)
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 16
    # "length" exactly when the budget ran out (issue 28)
    assert with_choices[-1].choices[0].finish_reason == ("length" if chunks[-1].usage.completion_tokens == 16 else "stop")
    full = oc.chat.completions.create(model="subq-decomposer", max_tokens=16, temperature=0,
                                      messages=[{"role": "user", "content": "Problem: Tom has 3 apples. How many?"}])
    assert text == full.choices[0].message.content  # greedy: the stream carries the same reply
    raw = httpx.post(stack["base"] + "/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": "subq-decomposer", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]") and raw.text.startswith("data: {")


def test_openai_status_errors_parse_for_our_4xx(stack):
    import openai

    oc = openai.OpenAI(base_url=stack["base"] + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as ei:
        oc.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert ei.value.code == "model_not_found" and ei.value.param == "model" and "gpt-9" in ei.value.message
    with pytest.raises(openai.BadRequestError) as ei:  # OpenAI's 400, never 422 (issue 28)
        oc.chat.completions.create(model="subq-decomposer", messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=100000)
    assert ei.value.param == "max_tokens" and ei.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as ei:
        oc.chat.completions.create(model="subq-decomposer", messages=[{"role": "user", "content": "hi"}], n=100)
    assert ei.value.param == "n"


def test_solver_5xx_burst_does_not_change_accuracy(stack, client):
    body = {"dataset": "gsm8k-ai-subq:test", "decomposer": "none", "limit": 12}
    clean = wait_eval(client, client.post("/v1/evaluations", json=body).json()["id"])
    with httpx.Client(base_url=stack["base"] + "/flaky", timeout=120) as fc:
        r = fc.post("/v1/evaluations", json=body)
        assert r.status_code == 202, r.text
        flaky = wait_eval(fc, r.json()["id"])
    stats = stack["flaky"].stats(keys=False)["by_status"]
    assert int(stats.get("500", 0)) + int(stats.get("503", 0)) > 0, stats  # faults were injected...
    assert flaky["status"] == "completed" and flaky["summary"]["errors"] == 0, flaky["summary"]
    for mode in ("paper", "strict", "flexible"):  # ...and retried: the same accuracy as the clean run
        assert flaky["summary"]["accuracy"][mode]["correct"] == clean["summary"]["accuracy"][mode]["correct"]
        assert flaky["summary"]["accuracy"][mode]["n"] == 12


def test_running_cap_is_429_with_retry_after_and_delete_cancels(stack):
    slow = stack["slow"]
    with httpx.Client(base_url=stack["base"] + "/busy", timeout=120) as c:
        r = c.post("/v1/evaluations", json={"dataset": "gsm8k:test", "decomposer": "none", "limit": 200})
        assert r.status_code == 202, r.text
        eid = r.json()["id"]
        r2 = c.post("/v1/evaluations", json={"dataset": "gsm8k:test", "decomposer": "none", "limit": 2})
        assert r2.status_code == 429 and r2.headers["retry-after"] == "7"
        assert r2.json()["error"]["code"] == "too_many_evaluations"
        deadline = time.time() + 60
        while slow.stats(keys=False)["total"] < 4 and time.time() < deadline:
            time.sleep(0.5)
        d = c.delete(f"/v1/evaluations/{eid}")
        assert d.status_code == 200 and d.json()["status"] == "cancelled", d.text
        time.sleep(3)  # calls already in flight (1.5 s each) may land
        n1 = slow.stats(keys=False)["total"]
        time.sleep(5)
        assert slow.stats(keys=False)["total"] == n1  # nothing new is sent
        v = c.get(f"/v1/evaluations/{eid}").json()
        assert v["status"] == "cancelled" and v["done"] < 200
        r3 = c.post("/v1/evaluations", json={"dataset": "gsm8k:test", "decomposer": "none", "limit": 1})
        assert r3.status_code == 202  # the slot is free again
        wait_eval(c, r3.json()["id"])
        assert c.delete(f"/v1/evaluations/{r3.json()['id']}").json()["deleted"] is True


def test_cost_cap_stops_an_evaluation(client):
    r = client.post("/v1/evaluations", json={"dataset": "gsm8k:test", "decomposer": "none", "limit": 30,
                                             "max_cost_usd": 1e-9})
    assert r.status_code == 202, r.text
    v = wait_eval(client, r.json()["id"])
    assert v["status"] == "stopped" and "cost cap" in v["error"] and v["done"] < 30, v
    r = client.post("/v1/evaluations", json={"dataset": "gsm8k:test", "decomposer": "none", "max_cost_usd": 1e9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_cost_usd"


def test_ingress_killed_mid_evaluation_keeps_finished_items(stack):
    import ray

    with httpx.Client(base_url=stack["base"] + "/busy", timeout=120) as c:
        eid = c.post("/v1/evaluations", json={"dataset": "gsm8k:test", "decomposer": "none", "limit": 40}).json()["id"]
        deadline = time.time() + 120
        while c.get(f"/v1/evaluations/{eid}").json()["done"] < 3 and time.time() < deadline:
            time.sleep(0.5)
        done_before = c.get(f"/v1/evaluations/{eid}").json()["done"]
        names = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if "busy" in a["name"] and "Ingress" in a["name"] and "REPLICA" in a["name"].upper()]
        assert len(names) == 1, names
        ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
        deadline = time.time() + 180
        v = None
        while time.time() < deadline:
            try:
                r = c.get(f"/v1/evaluations/{eid}", params={"items": "true"})
                if r.status_code == 200:
                    v = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
    assert v is not None and v["status"] == "interrupted", v and v["status"]
    assert v["done"] >= done_before >= 3 and len(v["items"]) == v["done"]
    assert all(it["answer_text"] for it in v["items"] if not it["error"])


def test_requests_arriving_within_a_tenth_of_a_second_are_batched_together(stack):
    """Requests reach the decomposer spread out by the HTTP proxy and the ingress (on a busy machine, tens of ms
    apart): the batch waits long enough to fill. 8 requests (the replica's max_batch_size) are sent 20 ms apart; every
    one that reached the replica within 0.15 s of the first is decoded in the first batch. Judged by the replica's
    own arrival times, so a loaded machine that spreads the burst further (CI saw [5, 3] and [2, 6]) does not decide
    it. With the old 10 ms wait the first went nearly alone: [3, 1, 2, 2] here (bench_serve, 32 clients: a mean
    batch of 3 of 32)."""
    from ray import serve

    from pipelines.serve import ServeConfig

    replica = serve.get_deployment_handle("Decomposer", app_name=ServeConfig().app_name)

    async def send():
        async with httpx.AsyncClient(base_url=stack["base"], timeout=120, headers=AUTH) as c:
            tasks = []
            for i in range(8):
                tasks.append(asyncio.create_task(c.post("/v1/decompose", json={"problem": f"Tom has {i} apples. " * 3})))
                await asyncio.sleep(0.02)
            return await asyncio.gather(*tasks)

    for _ in range(3):  # a burst the machine spread past 0.15 s (fewer than 4 within it) says nothing: sent again
        seen = replica.stats.remote().result()["batches"]
        replies = asyncio.run(send())
        assert [r.status_code for r in replies] == [200] * 8
        st = replica.stats.remote(since=seen).result()
        new = st["batches"] - seen
        sizes, batches = st["batch_sizes"], st["batch_arrivals"]
        assert new > 0 and sum(sizes) == 8, sizes
        t0 = batches[0][0]
        within = [t - t0 for b in batches for t in b if t - t0 <= 0.15]
        shown = (sizes, [[round(t - t0, 3) for t in b] for b in batches])
        if len(within) >= 4:
            first = [t - t0 for t in batches[0]]
            assert all(t in first for t in within), shown
            return
    raise AssertionError(f"three 20 ms-spaced bursts reached the replica spread past 0.15 s: {shown}")


def test_a_decomposer_replica_decodes_with_the_cpus_it_reserves(tmp_path):
    """The replica build_app makes for decomposer_num_cpus=N uses N torch threads (rounded down, at least 1), not
    always one: a replica given the whole machine must not leave cores idle. Built in-process from the app's own
    bound arguments (the thread count is process state, so it is restored after)."""
    import torch

    from pipelines.serve import ServeConfig, build_app
    from training.init_model import create_tiny_model

    model_dir = str(tmp_path / "tiny")
    create_tiny_model(model_dir, n_layer=1, n_embd=32)
    before = torch.get_num_threads()
    try:
        for cpus, want in ((2.0, 2), (0.5, 1), (1.0, 1)):
            app = build_app(ServeConfig(decomposer={"path": model_dir}, decomposer_num_cpus=cpus, api_keys_env=None))
            dep = app._bound_deployment.init_args[0]._bound_deployment  # the Decomposer deployment, as bound
            assert dep.ray_actor_options["num_cpus"] == cpus
            torch.set_num_threads(7)
            replica = dep.func_or_class(*dep.init_args)
            assert torch.get_num_threads() == want, cpus
            assert replica.stats()["torch_threads"] == want
    finally:
        torch.set_num_threads(before)
