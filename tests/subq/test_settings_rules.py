"""One rule per setting, shared by every entry point (issue 25): the price override and ILQL's beta. No Ray."""

from __future__ import annotations

import pytest
import yaml

from pipelines.evaluate import EvalConfig
from pipelines.generate import GenerateConfig
from pipelines.serve import ServeConfig
from subq.costs import DEFAULT_PRICES
from subq.settings import DecomposerSettings, SolverSettings


@pytest.mark.parametrize("inp,out", [(None, 0.05), (0.3, None), (0.3, 0.05)])
def test_one_price_override_gives_one_price_in_generation_and_evaluation(inp, out):
    """Overriding one side keeps the table's price of the other, in generation and in evaluation alike
    (before: the solver set the side not given to 0, generation kept the table's)."""
    model = "gpt-3.5-turbo"
    table = DEFAULT_PRICES[model]
    gen = GenerateConfig(output="o", model=model, price_input_per_1k=inp, price_output_per_1k=out).prices().price(model)
    sol = SolverSettings(name=model, price_input_per_1k=inp, price_output_per_1k=out).price()
    want = (table.input_per_1k if inp is None else inp, table.output_per_1k if out is None else out)
    assert (gen.input_per_1k, gen.output_per_1k) == want
    assert (sol.input_per_1k, sol.output_per_1k) == want


def test_an_unpriced_model_overridden_on_one_side_costs_zero_on_the_other_everywhere():
    gen = GenerateConfig(output="o", model="my-llm", price_output_per_1k=1.0).prices().price("my-llm")
    sol = SolverSettings(name="my-llm", price_output_per_1k=1.0).price()
    assert (gen.input_per_1k, gen.output_per_1k) == (sol.input_per_1k, sol.output_per_1k) == (0.0, 1.0)


@pytest.fixture(scope="module")
def ilql_beta4(tmp_path_factory):
    """A real ILQL checkpoint (tiny GPT-2 + heads) whose training config says beta = 4."""
    import torch

    from training.ilql import ILQLHeads, TargetQHeads, save_heads
    from training.init_model import create_tiny_model

    path = tmp_path_factory.mktemp("ilql4") / "final"
    create_tiny_model(str(path), n_layer=1, n_embd=32, n_head=2, vocab_size=512, max_texts=200)
    torch.manual_seed(0)
    heads = ILQLHeads(32, 512)
    save_heads(path, heads, TargetQHeads(heads))
    (path / "training_config.yaml").write_text(yaml.safe_dump({"algo": "ilql", "ilql": {"beta": 4.0}}))
    return str(path)


def _betas_used(monkeypatch, settings: DecomposerSettings, **request) -> list[float]:
    import training.ilql
    from training.decomposer import LocalDecomposer

    seen: list[float] = []
    real = training.ilql.guided_logits

    def spy(logits, q1, q2, v, beta):
        seen.append(beta)
        return real(logits, q1, q2, v, beta)

    monkeypatch.setattr(training.ilql, "guided_logits", spy)
    LocalDecomposer(settings).decompose_batch(["Tom has 2 apples and buys 3. How many?"], max_new_tokens=2, **request)
    return sorted(set(seen))


def test_an_ilql_checkpoint_is_served_and_evaluated_with_its_own_beta(ilql_beta4, monkeypatch):
    """`subq serve` and `subq eval` decode with the checkpoint's beta (4) unless the request or the operator says
    otherwise (before: both always decoded with the settings' default 1.0)."""
    served = ServeConfig(decomposer={"path": ilql_beta4}).decomposer
    evaluated = EvalConfig(decomposers=[ilql_beta4], out="o").decomposer.model_copy(update={"path": ilql_beta4})
    assert _betas_used(monkeypatch, served) == [4.0]
    assert _betas_used(monkeypatch, evaluated) == [4.0]
    assert _betas_used(monkeypatch, served, beta=0.5) == [0.5]  # a request's own beta wins
    assert _betas_used(monkeypatch, served.model_copy(update={"beta": 2.0})) == [2.0]  # so does the operator's


def test_a_decompose_request_overrides_exactly_the_decoding_settings():
    """POST /v1/decompose names the same decoding settings as `subq serve`, `subq eval` and training's validation
    (one definition: subq.settings.DecodingSettings); every one is optional (unset: the server's)."""
    from pipelines.serve.api import DecomposeRequest
    from subq.settings import DecodingSettings
    from training.config import TrainConfig

    assert set(DecomposeRequest.model_fields) - {"problem"} == set(DecodingSettings.model_fields)
    assert all(DecomposeRequest.model_fields[k].default is None for k in DecodingSettings.model_fields)
    assert TrainConfig.model_fields["eval_max_new_tokens"].default == DecodingSettings().max_new_tokens
