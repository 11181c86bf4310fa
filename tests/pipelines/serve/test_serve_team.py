"""An evaluation server a whole team can share (issue 27): named keys own their evaluations, per-key quotas, atomic
admission, the exposure rule on the address Serve really binds, browser-safe bodies and hosts, bounded work per
request, errors that say what and not where, auth that fails closed.

Pure tests first (key file, ledger, guard, the `serve deploy` config path), then one module-scoped Serve stack over
real HTTP on 127.0.0.1 with three applications: `/` (named keys alice, bob, an admin and keys with quotas; a tiny
local decomposer; a slow teacher server as the solver), `/open` (keyless: the browser and race checks) and `/dead`
(keyless, solver upstream on a closed port)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest
from conftest import free_port, local_ray

KEYS = {"alice": "sk-team-alice-0123456789", "bob": "sk-team-bob-0123456789", "admin": "sk-team-admin-0123456789",
        "racer": "sk-team-racer-0123456789", "meter": "sk-team-meter-0123456789",
        "spender": "sk-team-spender-0123456789", "keeper": "sk-team-keeper-0123456789"}
QUOTAS = {"racer": {"max_running_evaluations": 2}, "meter": {"requests_per_minute": 3},
          "spender": {"usd_per_day": 1e-6}, "keeper": {"max_stored_evaluations": 2}}
ONE = [{"question": "Tom has 2 apples and buys 3 more. How many apples does he have?", "answer": "#### 5"}]


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def write_key_file(path) -> str:
    lines = ["keys:"]
    for name, key in KEYS.items():
        lines.append(f"  - name: {name}\n    key: {key}")
        if name == "admin":
            lines.append("    admin: true")
        if name in QUOTAS:
            lines.append(f"    quotas: {json.dumps(QUOTAS[name])}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ------------------------------------------------------------------ pure


def test_key_file_names_admin_and_quotas(tmp_path, monkeypatch):
    from pipelines.serve_auth import digest, load_key_entries
    from subq.errors import ConfigError

    f = tmp_path / "keys.yaml"
    write_key_file(f)
    monkeypatch.setenv("SUBQ_TEAM_ENV_KEYS", f"{KEYS['alice']},sk-plain-env-key")
    entries = {e.name: e for e in load_key_entries("SUBQ_TEAM_ENV_KEYS", str(f))}
    assert set(entries) == set(KEYS) | {f"key-{digest('sk-plain-env-key')[:8]}"}  # alice once: the file's entry wins
    assert entries["admin"].admin and not entries["alice"].admin
    assert entries["meter"].quotas == {"requests_per_minute": 3}
    assert all(k not in json.dumps([e.public() for e in entries.values()]) for k in KEYS.values())  # digests only
    plain = tmp_path / "keys.txt"  # the one-key-a-line form still works
    plain.write_text("# team\nsk-a\n\nsk-b\n")
    assert [e.name for e in load_key_entries(None, str(plain))] == [f"key-{digest('sk-a')[:8]}", f"key-{digest('sk-b')[:8]}"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("keys:\n  - name: x\n    key: sk-x\n    quotas: {requests_per_hour: 5}\n")
    with pytest.raises(ConfigError) as ei:
        load_key_entries(None, str(bad))
    assert ei.value.field == "api_keys_file.keys.0.quotas" and "requests_per_hour" in str(ei.value)


def test_ledger_key_and_server_dollar_caps():
    from pipelines.serve_auth import Ledger

    led, now = Ledger(), time.time()
    g = {"quotas": {}, "max_usd_per_day": 1.0}
    a = {"id": "a", "name": "a", "quotas": {"usd_per_day": 0.5}}
    b = {"id": "b", "name": "b", "quotas": {}}
    led.add("a", 0.5, now)
    over = led.over_budget(a, g, now)
    assert over and over["code"] == "insufficient_quota" and 0 < over["retry_after"] <= 86400 and "usd_per_day" in over["message"]
    assert led.over_budget(b, g, now) is None  # another key is unaffected...
    led.add("b", 0.6, now)
    assert "max_usd_per_day" in led.over_budget(b, g, now)["message"]  # ...until the server's $ for today is spent
    assert led.over_budget(b, g, now + 86400) is None  # a new UTC day
    assert [led.hit("k", 2, 100.0), led.hit("k", 2, 101.0)] == [None, None]
    assert led.hit("k", 2, 110.0) == 50 and led.hit("k", 2, 160.5) is None  # sliding 60 s window


def test_dollars_spent_today_survive_an_ingress_restart(tmp_path):
    """The Ingress keeps each key's $ for the UTC day under its results root: a restarted (or crashed) replica must
    not hand every key a fresh day's budget."""
    from pipelines.serve_auth import Ledger

    now = time.time()
    led = Ledger()
    led.persist(str(tmp_path))
    led.add("a", 0.25, now)
    led.add("a", 0.15, now)
    led.add("b", 0.1, now)
    again = Ledger()  # a new replica process
    again.persist(str(tmp_path))
    assert again.spent("a", now) == pytest.approx(0.4) and again.spent("*", now) == pytest.approx(0.5)
    assert again.over_budget({"id": "a", "name": "a", "quotas": {"usd_per_day": 0.4}}, {}, now)
    assert again.spent("a", now + 86400) == 0.0  # tomorrow starts at 0
    again.add("b", 0.05, now)
    third = Ledger()
    third.persist(str(tmp_path))
    assert third.spent("b", now) == pytest.approx(0.15)
    assert [p.name for p in tmp_path.iterdir()] == [f"spend-{Ledger.day(now)}.json"]


def _asgi(app_status: list):
    async def app(scope, receive, send):
        app_status.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"reached"})

    return app


def test_auth_fails_closed_when_the_guard_is_missing(monkeypatch):
    from pipelines.serve_auth import GuardMiddleware

    for var in ("SUBQ_SERVE_GUARD", "SUBQ_SERVE_KEY_DIGESTS"):
        monkeypatch.delenv(var, raising=False)
    reached: list = []

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=GuardMiddleware(_asgi(reached))),
                                     base_url="http://127.0.0.1") as c:
            return await c.get("/v1/models"), await c.post("/v1/solve", json={"problem": "x"})

    for r in asyncio.run(go()):
        assert r.status_code == 500 and r.json()["error"]["code"] == "auth_not_configured", r.text
    assert reached == []


def test_guard_host_allow_list_cors_and_json_only(monkeypatch):
    """The middleware alone (no Ray): Host wildcards, CORS only for configured origins, non-JSON bodies only with an
    Authorization header (then read as JSON, as `curl -d` sends them)."""
    from pipelines.serve_auth import GuardMiddleware, set_guard

    monkeypatch.setenv("SUBQ_SERVE_GUARD", "")  # restored after the test
    set_guard([], 10_000, allowed_hosts=["*.example.com", "localhost"], cors_origins=["https://team.example.com"])
    seen: list = []

    async def app(scope, receive, send):
        seen.append(dict(scope["headers"]).get(b"content-type"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=GuardMiddleware(app)),
                                     base_url="http://api.example.com") as c:
            out = {"host_ok": await c.get("/v1/models"),
                   "host_bad": await c.get("/v1/models", headers={"host": "example.com.evil.net"}),
                   "cors_ok": await c.options("/v1/solve", headers={"origin": "https://team.example.com",
                                                                    "access-control-request-method": "POST"}),
                   "cors_bad": await c.options("/v1/solve", headers={"origin": "https://evil.example",
                                                                     "access-control-request-method": "POST"}),
                   "plain": await c.post("/v1/solve", content=b'{"problem": "x"}', headers={"content-type": "text/plain"}),
                   "plain_with_key": await c.post("/v1/solve", content=b'{"problem": "x"}',
                                                  headers={"content-type": "text/plain", "authorization": "Bearer k"})}
            return out

    r = asyncio.run(go())
    assert r["host_ok"].status_code == 200 and r["host_ok"].headers["x-request-id"].startswith("req-")
    assert r["host_bad"].status_code == 400 and r["host_bad"].json()["error"]["code"] == "invalid_host"
    assert r["cors_ok"].headers["access-control-allow-origin"] == "https://team.example.com"
    assert "access-control-allow-origin" not in r["cors_bad"].headers
    assert r["plain"].status_code == 415 and r["plain_with_key"].status_code == 200
    assert seen[-1] == b"application/json"


def test_serve_deploy_config_is_checked_on_the_address_it_binds(tmp_path, monkeypatch):
    """`subq serve --config` / `--check` read a Serve deploy config the way `serve deploy` binds it: http_options.host
    is the proxy's address; args.host saying loopback does not make 0.0.0.0 safe."""
    import yaml

    from pipelines.serve import ServeConfig, api_key_digests
    from pipelines.serve_cmd import serve_values_from_yaml
    from subq.errors import ConfigError

    monkeypatch.delenv("SUBQ_API_KEYS", raising=False)
    raw = yaml.safe_load(open("pipelines/serve_config.yaml"))
    raw["http_options"]["host"] = "0.0.0.0"
    f = tmp_path / "deploy.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as ei:
        api_key_digests(ServeConfig(**serve_values_from_yaml(str(f))))
    assert "0.0.0.0" in str(ei.value) and "API keys" in str(ei.value)
    raw["applications"][0]["args"]["host"] = "127.0.0.1"  # the args cannot hide what the proxy binds
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as ei:
        api_key_digests(ServeConfig(**serve_values_from_yaml(str(f))))
    assert ei.value.field == "http_options.host"


DEPLOY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    port = int(sys.argv[1])
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    config = {"http_options": {"host": "0.0.0.0", "port": port}, "applications": [{
        "name": "subq", "route_prefix": "/", "import_path": "pipelines.serve:app_builder",
        "args": {"api_keys_env": None, "results_root": sys.argv[2],  # args.host: the default 127.0.0.1
                 "solver": {"name": "gpt-3.5-turbo", "base_url": "http://127.0.0.1:9/v1"}}}]}
    for attempt in range(3):  # on a loaded machine the proxy can miss Serve's readiness timeout
        try:
            serve.start(http_options=config["http_options"])
            break
        except Exception:
            if attempt == 2:
                raise
            time.sleep(2)
    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate(config))  # what `serve deploy` and KubeRay hand the controller
    deadline, st = time.time() + 90, None
    while time.time() < deadline:
        st = serve.status().applications.get("subq")
        if st is not None and st.status in ("DEPLOY_FAILED", "RUNNING"):
            break
        time.sleep(0.5)
    open(sys.argv[3], "w").write(json.dumps({"status": st and str(st.status), "message": st and st.message}))
    serve.shutdown()
    ray.shutdown()
""")


@pytest.mark.slow
def test_serve_deploy_binding_all_interfaces_without_keys_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SUBQ_API_KEYS", "RAY_ADDRESS")}
    result = tmp_path / "result.json"
    r = subprocess.run([sys.executable, "-c", DEPLOY_SCRIPT, str(free_port()), str(tmp_path / "results"), str(result)],
                       capture_output=True, text=True, timeout=240, env=env, cwd=os.getcwd())
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out["status"].endswith("DEPLOY_FAILED"), out
    assert "refusing to serve on 0.0.0.0 without API keys" in out["message"]


# ------------------------------------------------------------------ one Serve stack over HTTP


def _never_ending_model(path: str) -> str:
    """A tiny GPT-2 with a long context whose EOS can never be the greedy choice (its output embedding is zero, so
    its logit is 0 while the best of 2,047 random logits is > 0): a greedy decode runs to its whole budget."""
    import torch
    from transformers import AutoModelForCausalLM

    from training.init_model import create_tiny_model

    create_tiny_model(path, n_layer=1, n_embd=32, n_positions=8192, max_texts=300)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_output_embeddings().weight[model.config.eos_token_id].zero_()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from ray import serve

    from pipelines.serve import ServeConfig, build_app, start_serve, stop_serve, wait_healthy
    from pipelines.teacher_server import TeacherServer
    from training.init_model import create_tiny_model

    def config(**kw):
        return ServeConfig(**kw)

    tmp = tmp_path_factory.mktemp("team")
    model_dir = str(tmp / "tiny")
    create_tiny_model(model_dir, n_layer=1, n_embd=32, n_positions=128)
    os.environ["SUBQ_TEST_SOLVER_KEY"] = "local-test-key"
    os.environ["SUBQ_TEAM_TEST_KEYS"] = ",".join(KEYS.values())  # the same keys, unnamed: the file names them
    local_ray()
    with TeacherServer(latency_s=1.0) as slow:
        port = free_port()
        solver = {"name": "gpt-3.5-turbo", "base_url": slow.base_url, "api_key_env": "SUBQ_TEST_SOLVER_KEY",
                  "max_retries": 1, "timeout_s": 30}
        main = config(port=port, decomposer={"path": model_dir, "max_new_tokens": 16}, solver=solver,
                      decomposer_num_cpus=0.5, api_keys_env="SUBQ_TEAM_TEST_KEYS",
                      api_keys_file=write_key_file(tmp / "keys.yaml"), max_running_evaluations=16,
                      eval_concurrency=1, results_root=str(tmp / "results-main"))
        base = start_serve(main, ray_init={})
        dead_port = free_port()
        long_dir = _never_ending_model(str(tmp / "long"))
        apps = {
            "open": config(port=port, app_name="open", route_prefix="/open", api_keys_env=None, solver=solver,
                           max_running_evaluations=4, eval_concurrency=1, max_request_bytes=2_000_000,
                           results_root=str(tmp / "results-open")),
            "dead": config(port=port, app_name="dead", route_prefix="/dead", api_keys_env=None, eval_retries=0,
                           solver={**solver, "base_url": f"http://127.0.0.1:{dead_port}/v1", "max_retries": 0},
                           results_root=str(tmp / "results-dead")),
            "long": config(port=port, app_name="long", route_prefix="/long", api_keys_env=None, solver=solver,
                           decomposer={"path": long_dir, "max_new_tokens": 16}, decomposer_num_cpus=0.5,
                           results_root=str(tmp / "results-long")),
        }
        for name, c in apps.items():
            serve.run(build_app(c), name=name, route_prefix=c.route_prefix, blocking=False)
        for name in apps:
            wait_healthy(f"{base}/{name}", timeout_s=120)
        try:
            yield {"base": base, "port": port, "tmp": tmp, "slow": slow, "dead": f"127.0.0.1:{dead_port}"}
        finally:
            stop_serve()


def _client(stack, who=None, prefix="") -> httpx.Client:
    return httpx.Client(base_url=stack["base"] + prefix, timeout=120, headers=auth(who) if who else {})


def _wait(c: httpx.Client, eid: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while True:
        v = c.get(f"/v1/evaluations/{eid}").json()
        if v["status"] != "running" or time.time() > deadline:
            return v
        time.sleep(0.3)


def _purge(c: httpx.Client, eid: str) -> None:
    for _ in range(2):  # a running one is cancelled first, then deleted
        c.delete(f"/v1/evaluations/{eid}")


@pytest.mark.slow
def test_keys_own_their_evaluations_and_an_admin_sees_all(stack):
    with _client(stack, "alice") as a, _client(stack, "bob") as b, _client(stack, "admin") as adm:
        r = a.post("/v1/evaluations", json={"records": ONE, "decomposer": "none"})
        assert r.status_code == 202, r.text
        eid = r.json()["id"]
        assert eid in [e["id"] for e in a.get("/v1/evaluations").json()["data"]]
        assert eid not in [e["id"] for e in b.get("/v1/evaluations").json()["data"]]
        unknown = b.get("/v1/evaluations/eval-000000000000").json()
        for method, path in (("GET", f"/v1/evaluations/{eid}"), ("GET", f"/v1/evaluations/{eid}/paper_raw"),
                             ("DELETE", f"/v1/evaluations/{eid}")):
            r = b.request(method, path)
            assert r.status_code == 404, (method, path, r.status_code, r.text[:200])  # 404, not 403: ids do not leak
            assert r.json()["error"]["code"] == unknown["error"]["code"] == "not_found"
        v = _wait(a, eid)
        assert v["status"] == "completed" and v["owner"] == "alice"
        listed = {e["id"]: e for e in adm.get("/v1/evaluations").json()["data"]}
        assert listed[eid]["owner"] == "alice"
        assert adm.get(f"/v1/evaluations/{eid}/paper_raw").status_code == 200
        meta = json.loads((stack["tmp"] / "results-main" / eid / "meta.json").read_text())
        assert meta["owner"]["name"] == "alice" and meta["owner"]["id"].startswith("key-")
        stored = "".join(p.read_text(errors="replace") for p in (stack["tmp"] / "results-main").rglob("*") if p.is_file())
        assert all(k not in stored for k in KEYS.values())  # the key itself is never written
        assert adm.delete(f"/v1/evaluations/{eid}").json()["deleted"] is True
        assert a.get(f"/v1/evaluations/{eid}").status_code == 404


async def _burst(base: str, headers: dict, n: int, body: dict) -> list:
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=headers,
                                 limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(c.post("/v1/evaluations", json=body) for _ in range(n)))


@pytest.mark.slow
def test_64_concurrent_posts_against_a_limit_of_4_start_exactly_4(stack):
    body = {"dataset": "gsm8k:test", "decomposer": "none", "limit": 30}
    rs = asyncio.run(_burst(stack["base"] + "/open", {}, 64, body))
    codes = [r.status_code for r in rs]
    with _client(stack, prefix="/open") as c:
        running = c.get("/healthz").json()["evaluations"]  # the server's own count
        started = [r.json()["id"] for r in rs if r.status_code == 202]
        try:
            assert codes.count(202) == 4 and codes.count(429) == 60, sorted(codes)
            assert running == 4 and len(c.get("/v1/evaluations").json()["data"]) == 4
            assert all(r.headers["retry-after"] == "30" for r in rs if r.status_code == 429)
        finally:
            for eid in started:
                _purge(c, eid)


@pytest.mark.slow
def test_per_key_running_quota_leaves_other_keys_free(stack):
    body = {"dataset": "gsm8k:test", "decomposer": "none", "limit": 30}
    rs = asyncio.run(_burst(stack["base"], auth("racer"), 12, body))
    codes = [r.status_code for r in rs]
    with _client(stack, "racer") as racer, _client(stack, "bob") as b:
        mine = [r.json()["id"] for r in rs if r.status_code == 202]
        rb = b.post("/v1/evaluations", json=body)
        try:
            assert codes.count(202) == 2 and codes.count(429) == 10, sorted(codes)
            err = next(r for r in rs if r.status_code == 429).json()["error"]
            assert err["code"] == "too_many_evaluations" and "racer" in err["message"]
            assert rb.status_code == 202, rb.text  # another key is unaffected
        finally:
            for eid in mine:
                _purge(racer, eid)
            if rb.status_code == 202:
                _purge(b, rb.json()["id"])


@pytest.mark.slow
def test_rate_quota_is_429_with_retry_after_per_key(stack):
    import openai

    with _client(stack, "meter") as m, _client(stack, "bob") as b:
        assert [m.get("/v1/models").status_code for _ in range(3)] == [200] * 3
        r = m.get("/v1/models")
        assert r.status_code == 429, r.text
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert b.get("/v1/models").status_code == 200  # another key is unaffected
    oc = openai.OpenAI(base_url=stack["base"] + "/v1", api_key=KEYS["meter"], max_retries=0)
    with pytest.raises(openai.RateLimitError) as ei:
        oc.models.list()
    assert ei.value.code == "rate_limit_exceeded"


@pytest.mark.slow
def test_dollar_quota_counts_solve_spend_and_is_429(stack):
    problem = "Tom has 3 apples and buys 2 more. How many apples does he have?"
    with _client(stack, "spender") as s, _client(stack, "bob") as b:
        r = s.post("/v1/solve", json={"problem": problem, "decomposer": "teacher"})
        assert r.status_code == 200, r.text
        cost = r.json()["usage"]["total"]["cost_usd"]
        assert cost > 1e-6 and r.json()["usage"]["decompose"]["cost_usd"] > 0  # the paid solver, twice
        u = s.get("/v1/usage").json()
        assert u["key"] == "spender" and u["spent_usd_today"] == pytest.approx(cost, rel=1e-6)
        for path, body in (("/v1/solve", {"problem": problem, "decomposer": "none"}),
                           ("/v1/evaluations", {"records": ONE, "decomposer": "none"})):
            r = s.post(path, json=body)
            assert r.status_code == 429, (path, r.text)
            assert r.json()["error"]["code"] == "insufficient_quota" and int(r.headers["retry-after"]) >= 1
        assert s.get("/v1/models").status_code == 200  # free routes still answer
        assert b.post("/v1/solve", json={"problem": problem, "decomposer": "none"}).status_code == 200
    from pipelines.serve_auth import Ledger

    kept = json.loads((stack["tmp"] / "results-main" / f"spend-{Ledger.day()}.json").read_text())
    from pipelines.serve_auth import digest

    spender = f"key-{digest(KEYS['spender'])[:8]}"
    assert kept["spend"][spender] == pytest.approx(cost, rel=1e-6)  # what a restarted Ingress starts from


@pytest.mark.slow
def test_stored_evaluations_are_capped_per_key(stack):
    with _client(stack, "keeper") as k:
        ids = []
        for _ in range(2):
            r = k.post("/v1/evaluations", json={"records": ONE, "decomposer": "none"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        r = k.post("/v1/evaluations", json={"records": ONE, "decomposer": "none"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_stored_evaluations", r.text
        _wait(k, ids[0])
        assert k.delete(f"/v1/evaluations/{ids[0]}").json()["deleted"] is True
        r = k.post("/v1/evaluations", json={"records": ONE, "decomposer": "none"})
        assert r.status_code == 202, r.text
        for eid in (ids[1], r.json()["id"]):
            _purge(k, eid)


@pytest.mark.slow
def test_keyless_local_server_refuses_text_plain_form_and_foreign_host(stack):
    body = json.dumps({"problem": "What is 2 + 3?", "decomposer": "none"})
    with _client(stack, prefix="/open") as c:
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = c.post("/v1/solve", content=body, headers={"content-type": ctype})
            assert r.status_code == 415, (ctype, r.status_code, r.text[:200])
        for host in ("evil.example", "evil.example:%d" % stack["port"], "192.168.1.5"):
            r = c.get("/v1/models", headers={"host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", (host, r.text[:200])
        assert c.get("/v1/models", headers={"host": f"localhost:{stack['port']}"}).status_code == 200
        pre = c.options("/v1/solve", headers={"origin": "http://evil.example", "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in pre.headers  # CORS stays closed


def _ingress_pid(app: str) -> int:
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if any(f"ServeReplica:{app}:Ingress" in part for part in (p.info["cmdline"] or [])):
            return p.pid
    raise AssertionError(f"no Ingress replica process for {app}")


@pytest.mark.slow
def test_1mb_array_of_zeros_is_refused_fast_and_small(stack):
    import psutil

    proc = psutil.Process(_ingress_pid("open"))
    zeros = ",".join(["0"] * 500_000)
    bodies = {"/v1/evaluations": f'{{"records": [{zeros}]}}'.encode(),
              "/v1/solve": f'{{"problem": "What is 1 + 1?", "sub_questions": [{zeros}]}}'.encode()}
    assert all(len(b) >= 1_000_000 for b in bodies.values())
    peak, stop = [proc.memory_info().rss], threading.Event()

    def sample():
        while not stop.is_set():
            peak.append(proc.memory_info().rss)
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    base_rss = proc.memory_info().rss
    cpu0 = sum(proc.cpu_times()[:2])
    t.start()
    server, client, answers = {}, {}, []  # ms: in the Ingress (Server-Timing: body read, parse, refusal), round trip
    try:
        with _client(stack, prefix="/open") as c:
            for path, body in bodies.items():
                server[path], client[path] = [], []
                for _ in range(3):
                    t0 = time.perf_counter()
                    r = c.post(path, content=body, headers={"content-type": "application/json"})
                    client[path].append(round((time.perf_counter() - t0) * 1000, 1))
                    server[path].append(float(r.headers.get("server-timing", "dur=nan").split("dur=")[1]))
                    answers.append((path, r.status_code, r.json()["error"]["param"], len(r.content)))
    finally:
        stop.set()
        t.join()
    cpu_ms = (sum(proc.cpu_times()[:2]) - cpu0) * 1000 / 6  # the Ingress's CPU per request: what load cannot inflate
    extra_mb = (max(peak) - base_rss) / 2**20
    c0 = time.process_time()
    for body in bodies.values():  # this machine's speed now: parsing the body once, here
        json.loads(body)
    parse_ms = (time.process_time() - c0) * 1000 / 2
    print(f"1 MB array of zeros: ingress CPU {cpu_ms:.1f} ms/request (one json.loads here: {parse_ms:.1f} ms), ingress "
          f"wall ms {server}, round trip ms {client}, extra memory {extra_mb:.1f} MB")
    for path, status, param, size in answers:
        assert status == 400 and param == ("records" if "evaluations" in path else "sub_questions") \
            and size < 2000, answers
    assert extra_mb < 50, extra_mb
    # < 50 ms of the Ingress's CPU (was 3.5 s): about one JSON parse of the body, which on a loaded shared machine
    # alone can take longer, so the bound is 50 ms or three such parses
    assert cpu_ms < max(50.0, 3 * parse_ms), (cpu_ms, parse_ms)
    assert all(sorted(ts)[1] < 250 for ts in server.values()), server  # wall: a margin for a shared, loaded machine


@pytest.mark.slow
def test_decoding_settings_from_a_small_set_batch_together(stack):
    from ray import serve

    replica = serve.get_deployment_handle("Decomposer", app_name="subq")
    seen = replica.stats.remote().result()["batches"]

    async def send():
        async with httpx.AsyncClient(base_url=stack["base"], timeout=120, headers=auth("bob")) as c:
            return await asyncio.gather(*(c.post("/v1/decompose", json={
                "problem": f"Tom has {i} apples. How many?", "do_sample": True, "temperature": 0.31 + 0.01 * i,
                "max_new_tokens": 9 + i}) for i in range(6)))

    assert [r.status_code for r in asyncio.run(send())] == [200] * 6
    stats = replica.stats.remote(since=seen).result()
    new = stats["batches"] - seen
    sizes, groups = stats["batch_sizes"], stats["batch_groups"]  # groups: generate calls per batch
    assert new > 0 and sum(sizes) == 6
    assert groups == [1] * len(groups), (sizes, groups)  # six distinct settings, one call


@pytest.mark.slow
def test_a_decode_stops_when_its_client_leaves(stack):
    """A client that disconnects mid-decode (here: its read timeout) frees the replica: Serve cancels the Ingress's
    call, the Ingress cancels the Decomposer's, and the request's rows leave the running decode at the next check
    instead of decoding their whole budget (4,000 tokens: seconds on this model) for nobody."""
    from ray import serve

    replica = serve.get_deployment_handle("Decomposer", app_name="long")
    seen = len(replica.stats.remote().result()["cancelled"])
    body = {"problem": "Tom has 3 apples and buys 2 more. How many apples does he have?", "max_new_tokens": 4000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack["base"] + "/long/v1/decompose", json=body, timeout=httpx.Timeout(60, read=0.5))
    for _ in range(120):
        cancelled = replica.stats.remote().result()["cancelled"][seen:]
        if cancelled:
            break
        time.sleep(0.5)
    assert len(cancelled) == 1, "the decode ran on after its client left (no row was cancelled)"
    assert 0 < cancelled[0]["completion_tokens"] < cancelled[0]["max_new_tokens"] == 4000, cancelled
    r = httpx.post(stack["base"] + "/long/v1/decompose", json={**body, "max_new_tokens": 64}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64, r.text[:300]  # runs to its budget


@pytest.mark.slow
def test_chat_max_tokens_past_the_context_is_clamped(stack):
    r = httpx.post(stack["base"] + "/v1/chat/completions", headers=auth("bob"), timeout=120, json={
        "model": "subq-decomposer", "max_tokens": 200, "messages": [{"role": "user", "content": "Problem: 2 + 3?"}]})
    assert r.status_code == 200, r.text[:300]  # n_positions is 128: decoding 200 tokens ran past the position table
    assert 0 < r.json()["usage"]["completion_tokens"] <= 64


@pytest.mark.slow
def test_upstream_errors_say_what_not_where(stack):
    import ray

    with _client(stack, prefix="/dead") as c:
        r = c.post("/v1/solve", json={"problem": "What is 2 + 3?", "decomposer": "none"})
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        rid = r.headers["x-request-id"]
        text = r.text
        for leak in (stack["dead"], "127.0.0.1", "http://", "/v1", str(stack["tmp"]), "Error:", "Connect"):
            assert leak not in text, (leak, text)
        assert err["type"] == "upstream_error" and err["request_id"] == rid and rid in err["message"]
        v = _wait(c, c.post("/v1/evaluations", json={"records": ONE, "decomposer": "none"}).json()["id"])
        assert v["summary"]["errors"] == 1
        items = c.get(f"/v1/evaluations/{v['id']}", params={"items": "true"}).json()["items"]
        assert items[0]["error"] and stack["dead"] not in json.dumps(items)
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")
    found = ""
    for _ in range(20):  # the server log has the details under the request id
        found = "".join(open(os.path.join(logs, f), errors="replace").read() for f in os.listdir(logs)
                        if "dead" in f and "Ingress" in f)
        if rid in found:
            break
        time.sleep(0.5)
    line = next(ln for ln in found.splitlines() if rid in ln and "upstream=" in ln)
    assert stack["dead"] in line
