"""GenerateConfig (YAML + overrides, field-named errors), the dry-run estimate, and the release-form gold; no Ray."""

from __future__ import annotations

import pytest

from pipelines.generate import GenerateConfig, run_generate
from subq.recipe import release_gold
from subq.config import load_config
from subq.errors import ConfigError
from subq.scoring import answer_correctness


def test_yaml_and_overrides(tmp_path):
    y = tmp_path / "gen.yaml"
    y.write_text("input: gsm8k:test\noutput: out/x\nrpm: 500\nactors: 2,8\nn_sets: 2\n")
    cfg = load_config(GenerateConfig, y, {"rpm": 900, "limit": None})
    assert cfg.rpm == 900 and cfg.actors == (2, 8) and cfg.n_sets == 2 and cfg.n_feedback == 3
    assert load_config(GenerateConfig, None, {"output": "o", "actors": "3"}).actors == (3, 3)


@pytest.mark.parametrize("overrides,field", [({"actors": "4,2"}, "actors"), ({"n_sets": 0}, "n_sets"),
                                             ({"rpm": -1}, "rpm"), ({"template": "x"}, "template"), ({}, "output")])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"field '{field}"):
        load_config(GenerateConfig, None, {"output": "o", **overrides} if field != "output" else {})


def test_unknown_yaml_key_is_named(tmp_path):
    y = tmp_path / "gen.yaml"
    y.write_text("output: o\nrmp: 5\n")
    with pytest.raises(ConfigError, match="rmp"):
        load_config(GenerateConfig, y)


def test_unpriced_model_is_an_error_unless_priced():
    with pytest.raises(ConfigError, match="model"):
        GenerateConfig(output="o", model="my-llm").prices()
    assert GenerateConfig(output="o", model="my-llm", price_input_per_1k=0.5, price_output_per_1k=1).prices() \
        .cost("my-llm", 1000, 1000) == pytest.approx(1.5)


def test_release_gold_makes_the_paper_rule_read_the_final_answer():
    sol = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert release_gold(sol) == "#### 72" and release_gold("#### 5") == "#### 5"
    assert answer_correctness("A1: ..\n\nFinal answer: 72", release_gold(sol)) == 1.0
    assert answer_correctness("A1: ..\n\nFinal answer: 72", sol) == 0.0  # why the worked solution is not used


def test_dry_run_estimates_without_calls_or_output(tmp_path):
    out = tmp_path / "out"
    est = run_generate({"input": "gsm8k:test", "limit": 4, "output": str(out), "dry_run": True, "rpm": 60})
    assert est["dry_run"] and est["problems"] == 4 and est["calls"] == 4 * 15
    assert est["prompt_tokens"] > 4 * 15 * 100 and 0 < est["cost_usd_typical"] < est["cost_usd_max"]
    assert est["minutes_at_rpm"] == pytest.approx(1.0) and not out.exists()


def test_export_compacts_duplicate_rows_and_writes_both_paper_formats(tmp_path):
    from pipelines.generate.output import export
    from subq.schema import read_parquet, read_rows, write_parquet

    rows = read_rows(str(__import__("pathlib").Path(__file__).resolve().parents[3]
                         / "subq/data/gsm8k-ai-subq/qg_test_data_raw.jsonl"))[:5]
    out = tmp_path / "out"
    write_parquet(rows[:3], str(out / "parts" / "part-a.parquet"))
    write_parquet(rows[2:], str(out / "parts" / "part-b.parquet"))  # rows[2] twice
    res = export(str(out))
    assert res["rows"] == 5 and len(list((out / "parts").glob("*.parquet"))) == 1
    assert [r.problem_id for r in read_parquet(str(out / "parts"))] == [r.problem_id for r in rows]
    assert len(read_rows(str(out / "paper_raw.jsonl"))) == 5 and len(read_rows(str(out / "paper_dataset.json"))) == 5
