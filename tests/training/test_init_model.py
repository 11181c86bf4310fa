"""`subq init-model` and the decomposer loader/generator on the tiny model (no Ray)."""

from __future__ import annotations

import subprocess

import pytest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from training.init_model import create_tiny_model

    return create_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny"), n_layer=2, n_embd=64, vocab_size=1024)


def test_tiny_model_loads_with_transformers_alone(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    assert model.config.n_layer == 2 and model.config.n_embd == 64
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    text = "Natalia sold 48 clips.\n <QUE> How many clips did she sell? </QUE>"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # BPE trained on GSM8K: far fewer tokens than characters
    assert max(ids) < model.config.vocab_size


def test_generate_matches_hf_generate_with_left_padding(tiny):
    from training.decomposer import load_decomposer, generate_subquestions

    d = load_decomposer(tiny)
    problems = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.", "Hi"]
    gens = generate_subquestions(d, problems, max_new_tokens=10)
    assert [g.completion_tokens for g in gens] and all(0 < g.completion_tokens <= 10 for g in gens)
    for p, g in zip(problems, gens):
        enc = d.tokenizer([d.text_format.prompt(p)], return_tensors="pt")
        assert g.prompt_tokens == enc.input_ids.shape[1]
        o = d.model.generate(**enc, max_new_tokens=10, do_sample=False)
        assert d.tokenizer.decode(o[0, enc.input_ids.shape[1]:], skip_special_tokens=True) == g.text


def test_load_decomposer_rejects_non_model_dir(tmp_path):
    from subq.errors import ConfigError
    from training.decomposer import load_decomposer

    with pytest.raises(ConfigError, match="decomposer.path"):
        load_decomposer(str(tmp_path))


def test_init_model_cli(tmp_path, subq_bin):
    out = tmp_path / "m"
    r = subprocess.run([subq_bin, "init-model", str(out), "--layers", "1", "--width", "32", "--heads", "2",
                        "--vocab-size", "512"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    bad = subprocess.run([subq_bin, "init-model", str(tmp_path / "x"), "--width", "30", "--heads", "4"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "heads" in bad.stderr and "Traceback" not in bad.stderr
