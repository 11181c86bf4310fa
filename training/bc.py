"""Behaviour cloning (BC) and Filtered BC objective: next-token cross-entropy on sub-question tokens + EOS only.

Filtered BC is the same loss on the sets the teacher answered correctly (selection in training.data). The
released baseline averaged over padding too; here the mask is applied per token before the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bc_loss(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """mean over target tokens of -log pi(x_{t+1} | x_<=t). logits [B,T,V]; input_ids, target_mask [B,T]."""
    actions = input_ids[:, 1:]
    m = target_mask[:, 1:].float()
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), actions.reshape(-1), reduction="none")
    return (ce.view_as(m) * m).sum() / m.sum().clamp(min=1.0)
