"""The OpenAI chat endpoint as real clients use it (issue 28): the official `openai` SDK over HTTP against one Serve
app on 127.0.0.1 serving a tiny random ILQL decomposer (a GPT-2 with random Q/V heads, trained with beta 4) and, as
the local solver, the same tiny checkpoint. Served text equals offline decoding (issue 29): greedy, guided with the
checkpoint's beta or unguided (beta 0), 16 requests batched or one alone, streamed or not.

What a client must be able to rely on: `content` is the text the model generated (the same as offline decoding),
`finish_reason` says whether the budget ran out, and every request field is honoured or refused with a 400 that
names it (never a silent 200, never a 422)."""

from __future__ import annotations


import httpx
import pytest
from conftest import free_port, local_ray

pytestmark = pytest.mark.slow

DECOMPOSER, SOLVER = "subq-decomposer", "tiny-solver"
PROBLEM = "Problem: Tom has 3 apples and buys 2 more. How many apples does he have?"
MSGS = [{"role": "user", "content": PROBLEM}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):

    from pipelines.serve import ServeConfig, start_serve, stop_serve
    from training.init_model import create_tiny_model

    import json

    import torch
    import yaml

    from training.ilql import ILQLHeads, TargetQHeads, save_heads

    tmp = tmp_path_factory.mktemp("openai-compat")
    model_dir = create_tiny_model(str(tmp / "tiny"), n_layer=2, n_embd=64)
    conf = json.loads((tmp / "tiny" / "config.json").read_text())
    torch.manual_seed(0)
    heads = ILQLHeads(conf["n_embd"], conf["vocab_size"])
    save_heads(model_dir, heads, TargetQHeads(heads))
    (tmp / "tiny" / "training_config.yaml").write_text(yaml.safe_dump({"algo": "ilql", "ilql": {"beta": 4.0}}))
    local_ray()
    cfg = ServeConfig(port=free_port(), decomposer={"path": model_dir, "max_new_tokens": 24},
                      solver={"name": SOLVER, "backend": "local", "local_path": model_dir},
                      decomposer_num_cpus=0.5, api_keys_env=None, results_root=str(tmp / "results"))
    base = start_serve(cfg, ray_init={})
    try:
        yield {"base": base, "model_dir": model_dir}
    finally:
        stop_serve()


@pytest.fixture(scope="module")
def oc(stack):
    import openai

    return openai.OpenAI(base_url=stack["base"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(oc, **kw):
    return oc.chat.completions.create(model=DECOMPOSER, messages=MSGS, **kw)


def _stream_text(oc, **kw):
    chunks = list(_chat(oc, stream=True, stream_options={"include_usage": True}, **kw))
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    return text, with_choices[-1].choices[0].finish_reason, chunks[-1].usage


def test_content_is_the_decoders_text_and_finish_reason_says_why_it_stopped(oc, stack):
    from pipelines.serve import problem_from_messages
    from training.decomposer import generate_subquestions, load_decomposer

    offline = {k: generate_subquestions(load_decomposer(stack["model_dir"]), [problem_from_messages(MSGS)],
                                        max_new_tokens=k)[0] for k in (5, 24)}
    seen = []
    for k in (5, 24):
        res = _chat(oc, max_tokens=k, temperature=0)
        ch = res.choices[0]
        assert ch.message.content == offline[k].text  # what the model wrote, not what parsed out of it
        assert ch.sub_questions == offline[k].questions  # the parsed sub-questions: a documented extension field
        assert res.usage.completion_tokens == offline[k].completion_tokens
        assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
        seen.append((ch.finish_reason, res.usage.completion_tokens, k))
    res = _chat(oc, max_completion_tokens=5, temperature=0,  # the newer name of the same budget
                user="u-1", metadata={"run": "x"}, store=False, service_tier="auto")  # accepted, no effect
    assert res.choices[0].message.content == offline[5].text
    seen.append((res.choices[0].finish_reason, res.usage.completion_tokens, 5))
    text, finish, usage = _stream_text(oc, max_tokens=5, temperature=0)
    assert text == offline[5].text and usage.completion_tokens == offline[5].completion_tokens
    seen.append((finish, usage.completion_tokens, 5))
    assert ("length", 5, 5) in seen, seen  # 5 tokens of a random model never reach EOS
    for finish, used, budget in seen:
        assert (finish == "length") == (used == budget), seen
    # the local solver's chat path honours max_completion_tokens too
    res = oc.chat.completions.create(model=SOLVER, messages=MSGS, max_completion_tokens=3)
    assert res.usage.completion_tokens == 3 and res.choices[0].finish_reason == "length"


def test_decompose_served_equals_offline_guided_or_not_batched_or_alone(stack):
    """/v1/decompose for 16 problems sent at once (one batched decode in the Decomposer deployment) and for one
    sent alone give, problem by problem, the text, sub-questions and token count of offline decoding of that problem
    alone: with the checkpoint's own beta (4, the default) and unguided (beta 0), which differ."""
    from concurrent.futures import ThreadPoolExecutor

    from subq.problems import load_problems
    from training.decomposer import generate_subquestions, load_decomposer

    problems = [p.problem for p in load_problems("gsm8k:test", 16)]
    model = load_decomposer(stack["model_dir"])
    texts = {}
    with httpx.Client(base_url=stack["base"], timeout=300) as c:
        for beta in (None, 0.0):
            body = {"max_new_tokens": 12, **({} if beta is None else {"beta": beta})}
            with ThreadPoolExecutor(16) as ex:  # all in flight together: batched by @serve.batch
                served = list(ex.map(lambda p: c.post("/v1/decompose", json={"problem": p, **body}), problems))
            alone = c.post("/v1/decompose", json={"problem": problems[3], **body})
            for i, (p, r) in enumerate(zip(problems, served)):
                assert r.status_code == 200, r.text
                off = generate_subquestions(model, [p], max_new_tokens=12, beta=beta)[0]
                got = r.json()
                assert (got["text"], got["sub_questions"], got["usage"]["completion_tokens"]) == \
                    (off.text, off.questions, off.completion_tokens), (i, beta)
                texts[beta, i] = off.text
            assert alone.json()["text"] == texts[beta, 3]
    assert any(texts[None, i] != texts[0.0, i] for i in range(16))  # the heads steer: beta 4 is not plain LM


def test_subq_eval_decodes_what_is_served_and_what_offline_decoding_writes(stack, tmp_path):
    """`subq eval` (the Ray Data job, its decomposer actor loading the same checkpoint) writes, item by item, the
    decomposition that offline decoding and /v1/decompose give: with the checkpoint's own beta (4) and with beta 0."""
    import json

    from pipelines.evaluate import EvalConfig, run_eval
    from subq.problems import load_problems
    from training.decomposer import generate_subquestions, load_decomposer

    problems = [p.problem for p in load_problems("gsm8k:test", 16)]
    model = load_decomposer(stack["model_dir"])
    for beta in (None, 0.0):
        offline = [generate_subquestions(model, [p], max_new_tokens=12, beta=beta)[0].text for p in problems]
        cfg = EvalConfig(data="gsm8k:test", limit=16, out=str(tmp_path / f"eval-{beta}"),
                         decomposers=[f"ilql={stack['model_dir']}"], batch_size=16,
                         decomposer={"max_new_tokens": 12, "beta": beta},
                         solver={"name": SOLVER, "backend": "local", "local_path": stack["model_dir"], "max_tokens": 2})
        run_eval(cfg, progress=lambda s: None)
        res = json.loads((tmp_path / f"eval-{beta}" / "results.json").read_text())
        items = res["runs"][0]["items"]
        rows = {it["index"]: it["decomposition_text"] for it in items}
        assert [rows[i] for i in range(16)] == offline, beta
        with httpx.Client(base_url=stack["base"], timeout=300) as c:
            served = c.post("/v1/decompose", json={"problem": problems[5], "max_new_tokens": 12,
                                                    **({} if beta is None else {"beta": beta})}).json()
        assert served["text"] == rows[5]


def test_stop_sequence_from_a_first_reply_truncates_a_second_before_it(oc):
    kw = dict(max_tokens=24, temperature=1.0, seed=11)  # seeded sampling: varied text, the same twice
    first = _chat(oc, **kw).choices[0].message.content
    # an ASCII stop sequence across a word boundary (two streamed chunks), from the middle of the reply
    at = next(i for i in range(len(first) // 3, len(first) - 3)
              if first[i] == " " and first[i - 2:i + 3].isascii() and first[i - 2] != " ")
    stop = first[at - 2:at + 3]
    want = first[:first.index(stop)]
    assert 0 < len(want) < len(first)
    for stops in (stop, ["\x00never", stop]):
        res = _chat(oc, stop=stops, **kw)
        assert res.choices[0].message.content == want and res.choices[0].finish_reason == "stop"
        assert res.usage.completion_tokens < 24
    text, finish, usage = _stream_text(oc, stop=[stop], **kw)
    assert text == want and finish == "stop" and usage.completion_tokens == res.usage.completion_tokens


def test_seed_reproduces_sampling_and_n_returns_several_samples(oc):
    kw = dict(max_tokens=12, temperature=1.0, top_p=0.95)
    a, b = (_chat(oc, seed=7, **kw).choices[0].message.content for _ in range(2))
    c = _chat(oc, seed=8, **kw).choices[0].message.content
    assert a == b and a != c
    res = _chat(oc, seed=7, n=3, **kw)
    assert [ch.index for ch in res.choices] == [0, 1, 2]
    texts = [ch.message.content for ch in res.choices]
    assert texts[0] == a and len(set(texts)) == 3  # sample j of n is seeded seed + j
    assert res.usage.completion_tokens <= 3 * 12 and res.usage.completion_tokens >= 3


@pytest.mark.parametrize("kw,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"50": 5}}, "logit_bias"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"n": 100}, "n"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"extra_body": {"top_k": 5}}, "top_k"),  # not an OpenAI field: OpenAI refuses it, so do we
])
def test_unsupported_or_invalid_fields_are_400_naming_the_param(oc, kw, param):
    import openai

    for stream in (False, True):  # refused before any work, streamed or not
        with pytest.raises(openai.BadRequestError) as ei:
            list(_chat(oc, stream=True, **{"max_tokens": 4, **kw})) if stream else _chat(oc, **{"max_tokens": 4, **kw})
        assert ei.value.param == param and ei.value.type == "invalid_request_error" and ei.value.code, ei.value.body


def test_every_route_answers_a_bad_request_with_openais_400(stack):
    with httpx.Client(base_url=stack["base"], timeout=60) as c:
        for path, body, param in [("/v1/decompose", {"problem": "x?", "max_new_tokens": 0}, "max_new_tokens"),
                                  ("/v1/decompose", {"problem": ""}, "problem"),
                                  ("/v1/solve", {"problem": 5}, "problem"),
                                  ("/v1/evaluations", {"decomposer": "none", "limit": 0}, "limit"),
                                  ("/v1/evaluations", {"dataset": "nosuch:split", "decomposer": "none"}, "dataset")]:
            r = c.post(path, json=body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error" \
                and err["code"], (path, r.status_code, r.text)
