"""ILQL: losses against hand-computed values (TD sign, detached V(s'), masks), target sync, guided decoding;
and the acceptance run: on a synthetic dataset where one continuation earns 1 and the other 0 with equal
frequency, guided decoding picks the rewarded one while the BC policy stays near 50/50."""

from __future__ import annotations

import math

import pytest
import torch

from training.ilql import (ILQLConfig, ILQLHeads, TargetQHeads, expectile_loss, guided_logits, ilql_losses,
                           polyak_update, shift_actions, td_target)

BIG = 1e3  # values at masked positions: they must not change any loss


def _batch():
    # tokens x = [p, a1, a2, pad]; actions a_0 = x1, a_1 = x2 (targets), a_2 = x3 (padding, masked)
    ids = torch.tensor([[0, 1, 2, 1]])
    tmask = torch.tensor([[0, 1, 1, 0]])
    rewards = torch.tensor([[0.0, 0.5, 1.0, 0.0]])
    q1 = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [BIG, BIG, BIG], [BIG, 0, 0]]], requires_grad=True)
    q2 = torch.tensor([[[0.0, 0.6, 0.0], [0.0, 0.0, 1.5], [BIG, -BIG, BIG], [0, BIG, 0]]], requires_grad=True)
    v = torch.tensor([[0.2, 1.7, 0.6, BIG]], requires_grad=True)
    # non-trivial LM logits; huge at the padding rows (a leak of padding into the LM loss moves it by ~1e3)
    logits = torch.tensor([[[0.3, -1.2, 0.8], [1.5, 0.1, -0.4], [BIG, -BIG, 0], [0, BIG, -BIG]]], requires_grad=True)
    return ids, tmask, rewards, q1, q2, v, logits


def test_shift_actions_marks_done_on_last_target_token():
    ids, tmask, rewards, *_ = _batch()
    actions, m, r, done = shift_actions(ids, tmask, rewards)
    assert actions.tolist() == [[1, 2, 1]]
    assert m.tolist() == [[1, 1, 0]] and r.tolist() == [[0.5, 1.0, 0.0]] and done.tolist() == [[0, 1, 0]]


def test_td_target_sign_and_detach():
    v_next = torch.tensor([2.0], requires_grad=True)
    y = td_target(torch.tensor([1.0]), v_next, torch.tensor([0.0]), gamma=0.5)
    assert y.item() == pytest.approx(2.0)  # r + gamma V(s') = 1 + 0.5*2 (the released code had 1 - 1 = 0)
    assert not y.requires_grad
    assert td_target(torch.tensor([1.0]), v_next, torch.tensor([1.0]), 0.5).item() == pytest.approx(1.0)  # terminal


def test_expectile_loss_hand_values():
    u = torch.tensor([0.4, -0.2, 5.0])
    m = torch.tensor([1.0, 1.0, 0.0])
    # (0.9 * 0.16 + 0.1 * 0.04) / 2
    assert expectile_loss(u, 0.9, m).item() == pytest.approx(0.074)


def test_ilql_losses_hand_computed():
    ids, tmask, rewards, q1, q2, v, logits = _batch()
    cfg = ILQLConfig(gamma=0.5, tau=0.9, cql_weight=0.0, lm_weight=0.0)
    loss, s = ilql_losses(logits, q1, q2, q1.detach(), q2.detach(), v, ids, tmask, rewards, cfg)
    # targets y = [0.5 + 0.5 * V(s1)=1.7 -> 1.35, 1.0 (done)]; Q1(s,a) = [1.0, 2.0], Q2(s,a) = [0.6, 1.5]
    assert s["td_loss"] == pytest.approx(((1.0 - 1.35) ** 2 + (2.0 - 1.0) ** 2) / 2 + ((0.6 - 1.35) ** 2 + 0.25) / 2)
    assert s["td_loss"] == pytest.approx(0.9675)
    # u = min target Q - V(s) = [0.6 - 0.2, 1.5 - 1.7] -> (0.9 * 0.16 + 0.1 * 0.04) / 2
    assert s["expectile_loss"] == pytest.approx(0.074)
    assert loss.item() == pytest.approx(0.9675 + 0.074)


def test_td_loss_does_not_backprop_into_next_state_value():
    ids, tmask, rewards, q1, q2, v, logits = _batch()
    cfg = ILQLConfig(gamma=0.5, v_weight=0.0, cql_weight=0.0, lm_weight=0.0)
    loss, _ = ilql_losses(logits, q1, q2, q1.detach(), q2.detach(), v, ids, tmask, rewards, cfg)
    loss.backward()
    assert v.grad is None or torch.count_nonzero(v.grad) == 0  # V(s') is detached in the TD target
    assert q1.grad[0, 2].abs().sum() == 0 and q1.grad[0, 3].abs().sum() == 0  # no gradient from padding
    # expectile loss moves V only at action states (t = 0, 1), never at padding
    ids, tmask, rewards, q1, q2, v, logits = _batch()
    cfg = ILQLConfig(gamma=0.5, td_weight=0.0, cql_weight=0.0, lm_weight=0.0)
    loss, _ = ilql_losses(logits, q1, q2, q1.detach(), q2.detach(), v, ids, tmask, rewards, cfg)
    loss.backward()
    assert v.grad[0, 0] != 0 and v.grad[0, 1] != 0 and v.grad[0, 2] == 0 and v.grad[0, 3] == 0


def test_cql_and_lm_losses_masked_per_token_before_mean():
    ids, tmask, rewards, q1, q2, v, logits = _batch()
    cfg = ILQLConfig(td_weight=0.0, v_weight=0.0, cql_weight=1.0, lm_weight=1.0)
    _, s = ilql_losses(logits, q1, q2, q1.detach(), q2.detach(), v, ids, tmask, rewards, cfg)
    ce = lambda row, a: -torch.log_softmax(torch.tensor(row), -1)[a].item()  # noqa: E731
    want = (ce([0.0, 1.0, 0.0], 1) + ce([0.0, 0.0, 2.0], 2)) / 2 + (ce([0.0, 0.6, 0.0], 1) + ce([0.0, 0.0, 1.5], 2)) / 2
    assert s["cql_loss"] == pytest.approx(want, rel=1e-5)  # the BIG padding rows did not enter
    # actions a_0 = 1 from logits row 0, a_1 = 2 from row 1; the padding action (row 2) is masked
    lm_want = (ce([0.3, -1.2, 0.8], 1) + ce([1.5, 0.1, -0.4], 2)) / 2
    assert s["lm_loss"] == pytest.approx(lm_want, rel=1e-5)
    # the same check fails for the wrong shift (row t predicting x_t) and for the mask off (padding counted)
    assert (ce([0.3, -1.2, 0.8], 0) + ce([1.5, 0.1, -0.4], 1)) / 2 != pytest.approx(s["lm_loss"], rel=1e-3)
    assert (ce([0.3, -1.2, 0.8], 1) + ce([1.5, 0.1, -0.4], 2) + ce([BIG, -BIG, 0], 1)) / 3 != pytest.approx(s["lm_loss"], rel=1e-3)


def test_polyak_update_and_guided_logits():
    torch.manual_seed(0)
    heads = ILQLHeads(4, 5)
    target = TargetQHeads(heads)
    with torch.no_grad():
        for p in heads.q1.parameters():
            p.add_(1.0)
    before = [p.clone() for p in target.q1.parameters()]
    polyak_update(target, heads, 0.25)
    for b, t, o in zip(before, target.q1.parameters(), heads.q1.parameters()):
        assert torch.allclose(t, 0.75 * b + 0.25 * o)
    logits = torch.tensor([[0.0, 0.0]])
    g = guided_logits(logits, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 2.0]]), torch.tensor([0.25]), beta=2.0)
    # log 0.5 + 2 * (min(q1, q2) - V) = log .5 + 2 * [0.25, -0.25]
    assert torch.allclose(g, torch.tensor([[math.log(0.5) + 0.5, math.log(0.5) - 0.5]]))


# ---------------------------------------------------------------- synthetic acceptance run (real Ray Train)

GOOD, BAD = "How many apples?", "How many pears?"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


def _sequence_scores(d, problem: str, question: str, beta: float) -> float:
    """Sum over the target tokens of log softmax(guided scores) (beta=0: the LM's log-likelihood)."""
    tok = d.tokenizer
    pr = tok(d.text_format.prompt(problem), add_special_tokens=False).input_ids
    tg = tok(d.text_format.target([question]), add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = torch.tensor([pr + tg])
    with torch.no_grad():
        out = d.model(ids, output_hidden_states=True)
        h = out.hidden_states[-1][0]
        tq1, tq2 = d.target_heads(h)
        v = d.heads.v_head(h).squeeze(-1)
        scores = torch.log_softmax(guided_logits(out.logits[0], tq1, tq2, v, beta), -1)
    return sum(scores[len(pr) - 1 + i, t].item() for i, t in enumerate(tg))


def test_ilql_init_from_an_ilql_checkpoint_keeps_its_target_heads(tmp_path):
    """Resuming ILQL from an ILQL final/ restores the saved target heads (not a copy of the online heads)."""
    import shutil

    from transformers import AutoTokenizer

    from training.config import TrainConfig
    from training.ilql import load_heads, save_heads
    from training.init_model import create_tiny_model
    from training.train.loop import _build_module

    src = create_tiny_model(str(tmp_path / "m"), n_layer=1, n_embd=32, vocab_size=400, max_texts=200)
    ckpt = tmp_path / "ilql_final"
    shutil.copytree(src, ckpt)
    torch.manual_seed(1)
    heads = ILQLHeads(32, AutoTokenizer.from_pretrained(src).vocab_size)
    target = TargetQHeads(heads)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p))  # the target lags the online heads, as after Polyak syncs
    save_heads(ckpt, heads, target)
    cfg = TrainConfig(algo="ilql", data="x", model=src, init_from=str(ckpt))
    module, restored = _build_module(cfg, AutoTokenizer.from_pretrained(src))
    saved_heads, saved_target = load_heads(ckpt)
    assert restored is not None
    for a, b in zip(restored.state_dict().values(), saved_target.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(module.heads.state_dict().values(), saved_heads.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(restored.q1[0].weight, module.heads.q1[0].weight)


def test_ilql_policy_mode_is_validated():
    assert ILQLConfig().policy == "frozen"
    with pytest.raises(ValueError, match="policy"):
        ILQLConfig(policy="sometimes")


@pytest.mark.slow
def test_ilql_guided_decoding_picks_rewarded_continuation(tmp_path, ray_local):
    from subq.problems import problem_id
    from subq.schema import SubQRow, SubQuestionSet, write_parquet
    from training.decomposer import generate_subquestions, load_decomposer
    from training.init_model import create_tiny_model
    from training.train import run_train

    rows = []
    for k in range(8):
        prob = f"Problem {k}: Sam has {k + 2} apples and {k + 3} pears. How much fruit?"
        sets = [SubQuestionSet(f"Q1: {GOOD}", [GOOD], answer_correctness=1.0, usefulness=[1.0]),
                SubQuestionSet(f"Q1: {BAD}", [BAD], answer_correctness=0.0, usefulness=[0.0])]
        rows.append(SubQRow(problem_id(prob), prob, f"#### {2 * k + 5}", float(2 * k + 5), sets, source="syn", source_index=k))
    write_parquet(rows, str(tmp_path / "syn.parquet"))
    model = create_tiny_model(str(tmp_path / "tiny"), n_layer=2, n_embd=64)
    r = run_train(dict(algo="ilql", rewards="sparse", data=str(tmp_path / "syn.parquet"), model=model, steps=300,
                       batch_size=16, lr=2e-3, num_workers=1, deepspeed="zero0", storage_path=str(tmp_path / "runs"),
                       name="ilql-syn", val_fraction=0, checkpoint_every=1000, log_every=50, eval_problems=0,
                       ilql={"polyak": 0.05, "policy": "shared"}))  # the LM learns BC from scratch alongside
    d = load_decomposer(r["final_dir"])
    assert d.has_heads
    problems = [row.problem for row in rows]
    # the BC policy (the LM, trained with the plain BC loss on both continuations) stays near 50/50
    bc_p_good = [1 / (1 + math.exp(_sequence_scores(d, p, BAD, 0.0) - _sequence_scores(d, p, GOOD, 0.0))) for p in problems]
    assert all(0.35 < x < 0.65 for x in bc_p_good), bc_p_good
    # guided by the Q/V heads the rewarded continuation is preferred. At convergence adv(GOOD) - adv(BAD) = 1 at the
    # branch token (Q = 1 vs 0), so with beta = 1 its probability tends to sigmoid(1) = 0.73
    guided_p_good = [1 / (1 + math.exp(_sequence_scores(d, p, BAD, 1.0) - _sequence_scores(d, p, GOOD, 1.0))) for p in problems]
    assert all(g > 0.6 and g > b + 0.1 for g, b in zip(guided_p_good, bc_p_good)), (guided_p_good, bc_p_good)
    gens = generate_subquestions(d, problems, max_new_tokens=16, beta=1.0)
    assert [g.questions for g in gens] == [[GOOD]] * len(problems)
