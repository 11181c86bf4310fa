"""ILQL (Snell et al. 2022) for decomposers, in one file (CORL style): config, heads, losses, target sync,
guided decoding. The loop that drives it is `training.train` (Ray Train + DeepSpeed); this file has no Ray.

Token-level MDP over one sequence `x_0 .. x_{T-1}` (prompt, then the target sub-question tokens + EOS):
state s_t = the LM's last hidden state h_t after reading x_0..x_t, action a_t = x_{t+1}. Only actions whose
token is a target token count (`action_mask`: never the problem, never padding). Reward r_t sits on the token
it was earned on (sparse: answer_correctness on the final EOS; dense: usefulness[i] on the last token of
sub-question i plus correctness on EOS; placed by training.data via subq.textformat.target_with_spans).
The episode ends after the last target token (EOS): V(s_T) = 0.

Losses (paper names; defects of the released code fixed, see shared/docs/papers.md):
  td_loss        = sum_j mean_m (Q_j(s,a) - [r + gamma * (1 - done) * V(s').detach()])^2      (sign +, V(s') detached)
  expectile_loss = mean_m |tau - 1[u < 0]| * u^2,  u = min_j Qtarget_j(s,a).detach() - V(s)
  cql_loss       = sum_j mean_m CE(Q_j(s, .), a)        (mask applied per token, BEFORE the mean)
  lm_loss        = mean_m w * CE(logits(s, .), a),  w = 1, or AWAC exp((minQt - V)/awac_temperature) clipped
  loss = td_weight*td + v_weight*expectile + cql_weight*cql + lm_weight*lm
where mean_m is the mean over action positions only.

Target Q heads are fp32 Polyak copies held OUTSIDE the DeepSpeed engine (replicated on every rank) and synced
from the online heads gathered with `deepspeed.zero.GatheredParameters`; so they update under ZeRO-3 and
bf16 (a bf16 target with polyak 0.005 would round most updates away).

Policy modes (`ILQLConfig.policy`): "frozen" (the release: decode with the frozen BC policy, learn Q/V on its
features; the LM's weights stay bit-identical) or "shared" (trlx: one backbone for policy and heads; lm_weight keeps
the BC loss as the anchor).

Guided decoding (`guided_logits`): argmax/sample of log pi(a|s) + beta * (min_j Qtarget_j(s,a) - V(s)).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS_FILE = "ilql_heads.safetensors"
# the config lives in training.config (no torch there, so `subq --help` stays fast); re-exported here
from training.config import POLICY_MODES, ILQLConfig  # noqa: E402,F401


def _mlp(hidden: int, out: int) -> nn.Sequential:
    """The paper's head: Linear h->2h, ReLU, Linear 2h->out."""
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, out))


class ILQLHeads(nn.Module):
    """V head and twin Q heads over the LM's last hidden state (trained by the engine's optimizer)."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.v_head = _mlp(hidden_size, 1)
        self.q1 = _mlp(hidden_size, vocab_size)
        self.q2 = _mlp(hidden_size, vocab_size)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [B,T,H] -> (q1 [B,T,V], q2 [B,T,V], v [B,T])."""
        return self.q1(hidden), self.q2(hidden), self.v_head(hidden).squeeze(-1)


class TargetQHeads(nn.Module):
    """Polyak copies of q1/q2, fp32, no gradients, kept outside the engine."""

    def __init__(self, heads: ILQLHeads):
        super().__init__()
        self.q1 = copy.deepcopy(heads.q1).float()
        self.q2 = copy.deepcopy(heads.q2).float()
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = hidden.float()
        return self.q1(h), self.q2(h)

    @torch.no_grad()
    def action_values(self, hidden: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min_j Qtarget_j(s_t, a_t) for the taken actions only: hidden [B,T,H], actions [B,T] -> [B,T] fp32.
        Gathers the output layer's rows of the actions instead of computing [B,T,V] and picking one entry
        (two [B,T,V] fp32 tensors are ~800 MB per micro-batch at GPT-2 size)."""
        h = hidden.float()
        vals = []
        for q in (self.q1, self.q2):
            z = q[1](q[0](h))  # [B,T,2H]
            out = q[2]
            vals.append((z * out.weight[actions]).sum(-1) + out.bias[actions])
        return torch.minimum(vals[0], vals[1])


def _gathered(params):
    """Context that materialises ZeRO-3 partitioned params (a no-op for ordinary tensors)."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


def polyak_rate(alpha: float, every: int) -> float:
    """The Polyak rate for a sync every `every` steps that moves the target as far as `every` per-step syncs at
    rate `alpha` would: 1 - (1 - alpha)^every (fewer gathers of the online heads under ZeRO-3, same time scale)."""
    return 1.0 - (1.0 - alpha) ** max(1, int(every))


@torch.no_grad()
def polyak_update(target: TargetQHeads, heads: ILQLHeads, alpha: float) -> None:
    """target <- (1 - alpha) * target + alpha * online, in fp32; works under ZeRO-3 (gathers the online heads)."""
    for t_mod, o_mod in ((target.q1, heads.q1), (target.q2, heads.q2)):
        o_params = list(o_mod.parameters())
        with _gathered(o_params):
            for t, o in zip(t_mod.parameters(), o_params):
                t.lerp_(o.detach().to(device=t.device, dtype=torch.float32), alpha)


# ---------------------------------------------------------------- losses


def shift_actions(input_ids: torch.Tensor, target_mask: torch.Tensor, rewards: torch.Tensor):
    """Per-token tensors -> per-action tensors (length T-1): actions a_t = x_{t+1}, mask, reward, done."""
    actions = input_ids[:, 1:]
    mask = target_mask[:, 1:].float()
    r = rewards[:, 1:].float()
    next_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    done = mask * (1.0 - next_mask)  # the last target action of each sequence ends the episode
    return actions, mask, r, done


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def expectile_loss(u: torch.Tensor, tau: float, mask: torch.Tensor) -> torch.Tensor:
    """mean_m |tau - 1[u<0]| * u^2 (u = target Q - V)."""
    return _masked_mean((tau - (u < 0).float()).abs() * u.pow(2), mask)


def td_target(r: torch.Tensor, v_next: torch.Tensor, done: torch.Tensor, gamma: float) -> torch.Tensor:
    """r + gamma * (1 - done) * V(s').detach()  (the released code had r - gamma V and no detach)."""
    return r + gamma * (1.0 - done) * v_next.detach()


def ilql_losses(logits, q1, q2, tq1, tq2, v, input_ids, target_mask, rewards, cfg: ILQLConfig, *,
                host_stats: bool = True) -> tuple[torch.Tensor, dict]:
    """All ILQL losses for one batch. logits/q1/q2/tq1/tq2: [B,T,V]; v: [B,T]; the rest [B,T]. Or tq2=None and
    tq1 = min_j Qtarget_j(s_t, a_t) already computed for the actions, [B,T-1] (TargetQHeads.action_values).
    Returns (total loss, stats): floats, or with host_stats=False detached 0-d tensors (no device->host sync)."""
    actions, m, r, done = shift_actions(input_ids, target_mask, rewards)
    a = actions.unsqueeze(-1)
    q1_all, q2_all = q1[:, :-1].float(), q2[:, :-1].float()
    q1_sa, q2_sa = q1_all.gather(-1, a).squeeze(-1), q2_all.gather(-1, a).squeeze(-1)
    if tq2 is None:
        tq_sa = tq1.float().detach()
    else:
        tq_sa = torch.minimum(tq1[:, :-1].float().gather(-1, a), tq2[:, :-1].float().gather(-1, a)).squeeze(-1).detach()
    v = v.float()
    v_s, v_next = v[:, :-1], v[:, 1:]

    y = td_target(r, v_next, done, cfg.gamma)
    td = _masked_mean((q1_sa - y).pow(2), m) + _masked_mean((q2_sa - y).pow(2), m)
    expectile = expectile_loss(tq_sa - v_s, cfg.tau, m)
    flat = actions.reshape(-1)
    cql = sum(_masked_mean(F.cross_entropy(q.reshape(-1, q.shape[-1]), flat, reduction="none").view_as(m), m)
              for q in (q1_all, q2_all))
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), flat, reduction="none").view_as(m)
    if cfg.awac_temperature:
        w = torch.exp((tq_sa - v_s).detach() / cfg.awac_temperature).clamp(max=cfg.awac_max_weight)
        ce = ce * w
    lm = _masked_mean(ce, m)
    loss = cfg.td_weight * td + cfg.v_weight * expectile + cfg.cql_weight * cql + cfg.lm_weight * lm
    stats = {"loss": loss, "td_loss": td, "expectile_loss": expectile, "cql_loss": cql, "lm_loss": lm,
             "q_mean": _masked_mean(q1_sa, m), "v_mean": _masked_mean(v_s, m)}
    stats = {k: x.detach() for k, x in stats.items()}
    return loss, ({k: x.item() for k, x in stats.items()} if host_stats else stats)


# ---------------------------------------------------------------- guided decoding


def guided_logits(logits: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, v: torch.Tensor, beta: float) -> torch.Tensor:
    """Next-token scores log pi(a|s) + beta * (min(q1, q2)(s,a) - V(s)). logits/q1/q2: [B,V]; v: [B]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp + beta * (torch.minimum(q1.float(), q2.float()) - v.float().unsqueeze(-1))


# ---------------------------------------------------------------- save / load


def save_heads(path: str | Path, heads: ILQLHeads, target: TargetQHeads | None, state: dict | None = None,
               target_state: dict | None = None) -> None:
    """Write ilql_heads.safetensors: online heads (`heads.*`) and target heads (`target.*`), fp32.
    `state` (a full state dict of the heads, e.g. consolidated from ZeRO-3) overrides heads' own tensors;
    `target_state` (a CPU copy, e.g. for a write in a helper thread) overrides target's."""
    from safetensors.torch import save_file

    online = state if state is not None else heads.state_dict()
    tensors = {f"heads.{k}": v.detach().float().cpu().contiguous() for k, v in online.items()}
    tgt = target_state if target_state is not None else target.state_dict()
    tensors.update({f"target.{k}": v.detach().float().cpu().contiguous() for k, v in tgt.items()})
    meta = {"hidden_size": str(heads.hidden_size), "vocab_size": str(heads.vocab_size), "format": "subq-ilql-1"}
    save_file(tensors, str(Path(path) / HEADS_FILE) if Path(path).is_dir() else str(path), metadata=meta)


def load_heads(path: str | Path, device: str = "cpu") -> tuple[ILQLHeads, TargetQHeads]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = Path(path) / HEADS_FILE if Path(path).is_dir() else Path(path)
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(file), device=device)
    heads = ILQLHeads(int(meta["hidden_size"]), int(meta["vocab_size"]))
    heads.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("heads.")})
    target = TargetQHeads(heads)
    target.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("target.")})
    return heads.to(device).eval(), target.to(device).eval()


def heads_info(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(Path(path) / HEADS_FILE), framework="pt") as f:
        return json.loads(json.dumps(f.metadata() or {}))
