"""What a teacher call returns (ChatResult) and what the provider bills for it, counted reply by reply into the\ncaller's account (BILLING, a ContextVar: concurrent problems on one client stay apart)."""

from __future__ import annotations

import contextvars
from dataclasses import asdict, dataclass, field
from typing import Optional


# what the provider bills, counted into the dict the caller set here (e.g. one problem's accounts), reply by reply:
# every reply that arrived, usable or not (re-sampled, invalid, retried after it arrived): "billed_replies",
# "billed_prompt_tokens", "billed_completion_tokens", "billed_cost_usd" and "billed_by_template" {template id:
# [prompt, completion, $]}, from the reply's own `usage`; calls that may have been billed without a reply
# (timeout after sending, dropped connection, unreadable 200, a call cancelled in flight): "maybe_billed" and
# "maybe_billed_usd", priced at the hold estimate (prompt estimate + max_tokens at the online price).
# A ContextVar, so concurrent problems on one client stay apart.
BILLING: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("subq_billing", default=None)


def _bill(pt: int, ct: int, cost: float, template_id: Optional[str]) -> None:
    acc = BILLING.get()
    if acc is None:
        return
    acc["billed_replies"] = acc.get("billed_replies", 0) + 1
    acc["billed_prompt_tokens"] = acc.get("billed_prompt_tokens", 0) + pt
    acc["billed_completion_tokens"] = acc.get("billed_completion_tokens", 0) + ct
    acc["billed_cost_usd"] = acc.get("billed_cost_usd", 0.0) + cost
    t = acc.setdefault("billed_by_template", {}).setdefault(template_id or "", [0, 0, 0.0])
    t[0] += pt
    t[1] += ct
    t[2] += cost


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    attempts: int  # HTTP attempts made for this call (0 when served from the cache)
    cached: bool  # True: read from the durable cache, nothing paid now
    key: str = ""  # content-addressed cache key
    model: str = ""
    provenance: Optional[str] = None  # the reply's system_fingerprint (the teacher server labels replay/synthetic)
    invalid_reason: Optional[str] = None  # set when validation failed on every sample and accept_invalid was True
    n_429: int = 0
    raw_headers: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
