"""A long-lived evaluation's state (`Evaluation`) and what is retried inside one."""

import asyncio
import time
from typing import Optional

from subq.evaluation import ItemResult, summarize_items
from pipelines.serve.api import ApiError

RETRY_STATUSES = (429, 500, 502, 503, 504)


def _transient(e: BaseException) -> bool:
    """Worth retrying inside an evaluation: a deployment's 503/429 (back-pressure) or a solver upstream's 429/5xx."""
    return isinstance(e, ApiError) and (e.status in (429, 503) or e.upstream_status in RETRY_STATUSES)


class Evaluation:
    """An evaluation held by the ingress replica (an asyncio task), polled by id, persisted by EvalStore."""

    def __init__(self, eid: str, req: dict, total: int, decomposer: str, solver: str, *, status: str = "running",
                 created: Optional[float] = None, cap_usd: float = 0.0, owner: Optional[dict] = None):
        self.owner = owner  # {"id", "name"} of the key that created it (never the key); None: from before owners
        self.id, self.req, self.total = eid, req, total
        self.decomposer, self.solver = decomposer, solver
        self.items: dict[int, ItemResult] = {}
        self.status = status
        self.error: Optional[str] = None
        self.created = created or time.time()
        self.finished: Optional[float] = None
        self.report: Optional[list[str]] = None
        self.task: Optional[asyncio.Task] = None
        self.cap_usd = cap_usd

    @property
    def spent_usd(self) -> float:
        return sum(u.get("cost_usd", 0.0) for it in self.items.values() for u in it.usage.values())

    def meta(self) -> dict:
        return {"id": self.id, "request": self.req, "total": self.total, "decomposer": self.decomposer,
                "solver": self.solver, "status": self.status, "error": self.error, "created": self.created,
                "finished": self.finished, "report": self.report, "cap_usd": self.cap_usd, "owner": self.owner}

    @classmethod
    def from_meta(cls, meta: dict, items: list[dict]) -> "Evaluation":
        ev = cls(meta["id"], meta["request"], meta["total"], meta["decomposer"], meta["solver"], status=meta["status"],
                 created=meta.get("created"), cap_usd=meta.get("cap_usd", 0.0), owner=meta.get("owner"))
        ev.error, ev.finished, ev.report = meta.get("error"), meta.get("finished"), meta.get("report")
        for d in items:
            it = ItemResult.from_dict(d)
            ev.items[it.index] = it
        return ev

    def view(self, with_items: bool) -> dict:
        items = sorted(self.items.values(), key=lambda i: i.index)
        summary = summarize_items(items, self.total)
        mode = self.req.get("scoring_mode", "paper")
        out = {
            "id": self.id, "status": self.status, "done": len(items), "total": self.total,
            "progress": len(items) / self.total if self.total else 1.0,
            "decomposer": self.req.get("decomposer"), "decomposer_name": self.decomposer, "solver": self.solver,
            "dataset": self.req.get("dataset") if self.req.get("records") is None else "uploaded",
            "scoring_mode": mode, "accuracy": summary["accuracy"][mode]["accuracy"],
            "summary": summary, "spent_usd": round(self.spent_usd, 8), "max_cost_usd": self.cap_usd,
            "offline": summary["offline"], "error": self.error, "created": self.created, "finished": self.finished,
            "report": self.report, "owner": (self.owner or {}).get("name"),
        }
        if with_items:
            out["items"] = [it.to_dict() for it in items]
        return out
