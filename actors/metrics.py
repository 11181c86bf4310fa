"""The teacher client's Ray metrics (requests, retries, 429s, tokens, $ per endpoint and model) and the stats dict that feeds them."""

from __future__ import annotations

from actors.cache import normalize_endpoint


# client counters exported through ray.util.metrics (Prometheus names get Ray's "ray_" prefix)
METRICS = {"attempts": "subq_teacher_requests", "retries": "subq_teacher_retries", "n_429": "subq_teacher_429",
           "n_5xx": "subq_teacher_5xx", "timeouts": "subq_teacher_timeouts", "cache_hits": "subq_teacher_cache_hits",
           "prompt_tokens": "subq_teacher_tokens_in", "completion_tokens": "subq_teacher_tokens_out",
           "cost_usd": "subq_teacher_cost_usd", "maybe_billed_usd": "subq_teacher_maybe_billed_usd",
           "limiter_wait_s": "subq_limiter_wait_seconds"}


class TeacherMetrics:
    """Ray metrics of one client (tags: endpoint, model): the counters above, calls in flight (gauge). Only
    inside a Ray worker or driver; elsewhere every method does nothing."""

    def __init__(self, endpoint: str, model: str):
        self.tags = {"endpoint": normalize_endpoint(endpoint), "model": model}
        self.counters: dict = {}
        self.in_flight = None
        try:
            import ray

            if not ray.is_initialized():
                return
            from ray.util.metrics import Counter, Gauge

            for k, name in METRICS.items():
                self.counters[k] = Counter(name, description=f"subq teacher client: {k}", tag_keys=("endpoint", "model"))
            self.in_flight = Gauge("subq_teacher_in_flight", description="teacher calls in flight (per process)",
                                   tag_keys=("endpoint", "model"))
        except Exception:  # metrics are best effort: never stop a call
            self.counters = {}

    def inc(self, key: str, n: float) -> None:
        c = self.counters.get(key)
        if c is not None and n > 0:
            c.inc(n, tags=self.tags)

    def set_in_flight(self, n: int) -> None:
        if self.in_flight is not None:
            self.in_flight.set(n, tags=self.tags)


class _MeteredStats(dict):
    """The client's `stats` dict; each increment of a metered key also goes to its Ray counter."""

    def __init__(self, metrics: TeacherMetrics, values: dict):
        super().__init__(values)
        self._metrics = metrics

    def __setitem__(self, key, value):
        old = self.get(key, 0)
        super().__setitem__(key, value)
        if key in METRICS:
            self._metrics.inc(key, value - old)
