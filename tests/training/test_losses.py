"""BC / LM loss and AWAC weights against hand computations that can fail.

The batch has non-trivial logits, a prompt (problem tokens, target_mask 0), target tokens (1) and right padding
(0, with huge logits there so that any leak of padding into the mean moves the loss by orders of magnitude).
The hand computation is plain Python over lists (no F.cross_entropy). Each test also runs deliberately wrong
variants (no shift, mask off, mask shifted the wrong way, AWAC sign flipped, ...) through the SAME check and
requires that check to fail: the check is strong enough to see those defects."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.bc import bc_loss
from training.config import ILQLConfig
from training.ilql import ilql_losses

V = 7
BIG = 50.0


def _batch():
    """2 sequences, T=7. Row 0: 3 prompt tokens, 3 target tokens, 1 pad. Row 1: 2 prompt, 5 target tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[3, 1, 4, 1, 5, 6, 0],
                        [2, 6, 5, 3, 5, 0, 2]])
    tmask = torch.tensor([[0, 0, 0, 1, 1, 1, 0],
                          [0, 0, 1, 1, 1, 1, 1]])
    logits = torch.randn(2, 7, V, generator=g) * 2.0
    logits[0, 5:] = BIG * torch.arange(V)  # predictions of the padding position and from it: must not count
    logits[0, 0, :] = -BIG * torch.arange(V)  # the prompt's first prediction (of a prompt token): must not count
    return ids, tmask, logits


def _log_softmax(row: list[float], k: int) -> float:
    m = max(row)
    return row[k] - m - math.log(sum(math.exp(x - m) for x in row))


def hand_bc(logits, ids, tmask, weights=None) -> float:
    """mean over (b, t) with tmask[b, t+1] = 1 of -log softmax(logits[b, t])[ids[b, t+1]] (times weights[b][t])."""
    total, n = 0.0, 0
    L, I, M = logits.tolist(), ids.tolist(), tmask.tolist()
    for b in range(len(I)):
        for t in range(len(I[b]) - 1):
            if M[b][t + 1]:
                w = 1.0 if weights is None else weights[b][t]
                total += -w * _log_softmax(L[b][t], I[b][t + 1])
                n += 1
    return total / n


def _check_bc(loss_fn) -> None:
    ids, tmask, logits = _batch()
    got = float(loss_fn(logits, ids, tmask))
    assert got == pytest.approx(hand_bc(logits, ids, tmask), rel=1e-5, abs=1e-6)


# deliberately wrong variants of the BC loss


def _ce(logits, actions):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), actions.reshape(-1), reduction="none")


def bc_no_shift(logits, ids, tmask):  # predicts x_t from x_<=t
    m = tmask.float()
    return (_ce(logits, ids).view_as(m) * m).sum() / m.sum()


def bc_mask_off(logits, ids, tmask):  # the prompt and the padding count too
    return _ce(logits[:, :-1], ids[:, 1:]).mean()


def bc_mask_wrong_shift(logits, ids, tmask):  # mask of the input token instead of the action token
    m = tmask[:, :-1].float()
    return (_ce(logits[:, :-1], ids[:, 1:]).view_as(m) * m).sum() / m.sum()


def bc_mean_over_padding(logits, ids, tmask):  # mask applied, but the mean taken over every position (release)
    m = tmask[:, 1:].float()
    return (_ce(logits[:, :-1], ids[:, 1:]).view_as(m) * m).mean()


def test_bc_loss_matches_hand_computation():
    _check_bc(bc_loss)
    ids, tmask, logits = _batch()
    # the value is not a constant of the batch shape: other targets give another loss
    assert float(bc_loss(logits, ids.roll(1, -1), tmask)) != pytest.approx(float(bc_loss(logits, ids, tmask)))


@pytest.mark.parametrize("wrong", [bc_no_shift, bc_mask_off, bc_mask_wrong_shift, bc_mean_over_padding])
def test_bc_check_fails_on_wrong_variant(wrong):
    with pytest.raises(AssertionError):
        _check_bc(wrong)


def test_bc_gradient_never_reaches_prompt_or_padding_predictions():
    ids, tmask, logits = _batch()
    logits.requires_grad_(True)
    bc_loss(logits, ids, tmask).backward()
    g = logits.grad.abs().sum(-1)
    # row 0 predicts its targets from t = 2, 3, 4; row 1 from t = 1..5
    assert (g[0] > 0).tolist() == [False, False, True, True, True, False, False]
    assert (g[1] > 0).tolist() == [False, True, True, True, True, True, False]


# ---------------------------------------------------------------- ILQL's LM loss and AWAC weights


def _heads():
    """q1/q2/target q/v for the batch, non-trivial, with huge values at positions that must not count."""
    g = torch.Generator().manual_seed(1)
    q1 = torch.randn(2, 7, V, generator=g)
    q2 = torch.randn(2, 7, V, generator=g)
    tq1 = torch.randn(2, 7, V, generator=g)
    tq2 = torch.randn(2, 7, V, generator=g)
    v = torch.randn(2, 7, generator=g)
    return q1, q2, tq1, tq2, v


def hand_awac_weights(ids, tq1, tq2, v, temperature, max_w) -> list[list[float]]:
    """w[b][t] = min(exp((min(tq1, tq2)[b, t, a] - V[b, t]) / T), max_w), a = ids[b, t+1]."""
    I, A, B, Vv = ids.tolist(), tq1.tolist(), tq2.tolist(), v.tolist()
    out = []
    for b in range(len(I)):
        row = []
        for t in range(len(I[b]) - 1):
            a = I[b][t + 1]
            adv = min(A[b][t][a], B[b][t][a]) - Vv[b][t]
            row.append(min(math.exp(adv / temperature), max_w))
        out.append(row)
    return out


def _check_lm(losses_fn, temperature, max_w=20.0):
    ids, tmask, logits = _batch()
    q1, q2, tq1, tq2, v = _heads()
    cfg = ILQLConfig(td_weight=0.0, v_weight=0.0, cql_weight=0.0, lm_weight=1.0, awac_temperature=temperature,
                     awac_max_weight=max_w)
    loss, s = losses_fn(logits, q1, q2, tq1, tq2, v, ids, tmask, torch.zeros(2, 7), cfg)
    w = None if temperature is None else hand_awac_weights(ids, tq1, tq2, v, temperature, max_w)
    want = hand_bc(logits, ids, tmask, w)
    assert s["lm_loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    return want


def test_ilql_lm_loss_is_the_bc_loss_without_awac():
    want = _check_lm(ilql_losses, None)
    ids, tmask, logits = _batch()
    assert want == pytest.approx(float(bc_loss(logits, ids, tmask)), rel=1e-6)


@pytest.mark.parametrize("temperature,max_w", [(1.0, 20.0), (0.5, 20.0), (0.25, 3.0)])
def test_awac_weights_match_hand_computation(temperature, max_w):
    want = _check_lm(ilql_losses, temperature, max_w)
    # the weights matter here: the weighted loss is not the plain one
    assert want != pytest.approx(_check_lm(ilql_losses, None), rel=1e-3)
    if max_w == 3.0:  # the clip is reached in this batch (otherwise the case tests nothing extra)
        ids, tmask, _ = _batch()
        _, _, tq1, tq2, v = _heads()
        w = hand_awac_weights(ids, tq1, tq2, v, temperature, float("inf"))
        m = tmask[:, 1:].tolist()
        assert any(w[b][t] > max_w and m[b][t] for b in range(2) for t in range(6))


def _awac_variant(kind):
    """ilql_losses with one deliberate defect in the AWAC weights (the rest of the loss as in training.ilql)."""

    def fn(logits, q1, q2, tq1, tq2, v, ids, tmask, rewards, cfg):
        actions, m = ids[:, 1:], tmask[:, 1:].float()
        a = actions.unsqueeze(-1)
        tq = torch.minimum(tq1[:, :-1].gather(-1, a), tq2[:, :-1].gather(-1, a)).squeeze(-1)
        v_s = v[:, 1:] if kind == "v_next" else v[:, :-1]
        if kind == "online_q":
            tq = torch.minimum(q1[:, :-1].gather(-1, a), q2[:, :-1].gather(-1, a)).squeeze(-1)
        if kind == "max_q":
            tq = torch.maximum(tq1[:, :-1].gather(-1, a), tq2[:, :-1].gather(-1, a)).squeeze(-1)
        adv = (v_s - tq) if kind == "sign" else (tq - v_s)
        w = torch.exp(adv / cfg.awac_temperature)
        if kind != "no_clip":
            w = w.clamp(max=cfg.awac_max_weight)
        ce = _ce(logits[:, :-1], actions).view_as(m) * w
        if kind == "mask_off":
            lm = ce.mean()
        else:
            lm = (ce * m).sum() / m.sum()
        return lm, {"lm_loss": lm.item()}

    fn.__name__ = f"awac_{kind}"
    return fn


@pytest.mark.parametrize("kind", ["sign", "v_next", "online_q", "max_q", "mask_off", "no_clip"])
def test_awac_check_fails_on_wrong_variant(kind):
    max_w = 3.0 if kind == "no_clip" else 20.0
    _check_lm(_awac_variant("none"), 0.25, max_w)  # the harness itself reproduces the right value
    with pytest.raises(AssertionError):
        _check_lm(_awac_variant(kind), 0.25, max_w)
