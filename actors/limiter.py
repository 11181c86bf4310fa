"""One cluster-wide rate limiter for a provider's limits: requests/minute and tokens/minute.

`TokenBucket` is plain Python (testable without Ray): a pacing scheduler (GCRA, the "virtual scheduling"
form of a token bucket). Each call *reserves* capacity and gets back how long to wait before sending, so
callers on many nodes never race for the same token; reservations are spaced `60/rpm` seconds apart (plus a
small burst), and tokens are charged up front (prompt estimate + max_tokens, as providers do; the real
`usage` is recorded afterwards, and refunded only with `refund_unused`). A 429 with `Retry-After` (or `x-ratelimit-remaining-* = 0` with
`x-ratelimit-reset-*`) pushes *every* caller's next slot past the reset time: one actor hitting the limit
backs the whole cluster off; a short one (a call that came a few ms early to a provider bucket that holds
less than one call) also teaches a pacing margin (`slack_s`) that covers the callers' send jitter. It also keeps the job's spend and an optional budget, so a budget cap is
enforced cluster-wide before a call is sent.

Against a provider whose token bucket holds less than one call (a call is admitted only when the bucket is full),
planned slots are not enough: a call that leaves late is not banked, so the next planned one arrives early (a 429).
So a token-limited call also passes an admission gate right before it is sent (`admit`): the provider's rule
applied to the times calls really leave, each one telling the gate when it did (`sent`, from the HTTP client's
send hook); the next call is counted from then. Measured through the real stack (tests/actors/test_rate_limit_stack.py:
two teacher actors, the openai client over HTTP, a bucket of 0.1 s at 600,000 TPM): no 429 in 120 calls, 0.88-0.91
of the limit used.

`RateLimiter` is the Ray actor around it. Use ONE per limit key (endpoint + model + account), found by name; it is
detached (outlives any job or replica) and each job registers the limits it asked for (the strictest applies):

    limiter = get_or_create_limiter("subq-limiter:api.openai.com:gpt-3.5-turbo", rpm=3500, tpm=90000)  # limiter_client
    wait_s = await limiter.reserve.remote(tokens=900)          # then sleep wait_s and send
    await limiter.settle.remote(reserved=900, used=640, cost_usd=0.0011)
    await limiter.report_429.remote(retry_after_s=2.0, headers={...})
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str | float | int | None) -> Optional[float]:
    """Seconds from a Retry-After / x-ratelimit-reset-* value: '2', '1.5', '6m0s', '120ms', '1h2m3s'."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text)
    text = str(text).strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(v) * scale[u] for v, u in parts)


def parse_retry_after(value, now: Optional[float] = None) -> Optional[float]:
    """Seconds from a Retry-After value: delta-seconds / a duration ('2', '1.5', '6m0s') or an HTTP-date
    ('Wed, 21 Oct 2026 07:28:00 GMT', RFC 9110; a date in the past is 0)."""
    v = parse_duration(value)
    if v is not None or value is None:
        return v
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(str(value).strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def headers_backoff(headers: dict | None) -> Optional[float]:
    """How long the provider's headers say to wait (None: no hint). Reads `retry-after-ms`, `retry-after`,
    and `x-ratelimit-reset-{requests,tokens}` when the matching `x-ratelimit-remaining-*` is 0."""
    if not headers:
        return None
    h = {str(k).lower(): v for k, v in headers.items()}
    if "retry-after-ms" in h:
        v = parse_duration(h["retry-after-ms"])
        if v is not None:
            return v / 1000.0
    if "retry-after" in h:
        v = parse_retry_after(h["retry-after"])
        if v is not None:
            return v
    waits = []
    for kind in ("requests", "tokens"):
        rem = h.get(f"x-ratelimit-remaining-{kind}")
        try:
            exhausted = rem is not None and float(rem) <= 0
        except ValueError:
            exhausted = False
        if exhausted:
            v = parse_duration(h.get(f"x-ratelimit-reset-{kind}"))
            if v is not None:
                waits.append(v)
    return max(waits) if waits else None


@dataclass
class TokenBucket:
    """Pacing for rpm (requests/min) and tpm (tokens/min); None = unlimited. `burst_s` seconds of capacity
    may be used at once (small, so a provider's own bucket never sees more than it allows)."""

    rpm: Optional[float] = None
    tpm: Optional[float] = None
    burst_s: float = 0.0
    budget_usd: Optional[float] = None
    # give back reserved-but-unused tokens after a reply. Off by default: providers (and the teacher server)
    # charge max_tokens against TPM when a request arrives, so refunding would outrun their bucket.
    refund_unused: bool = False
    # the longest Retry-After / reset honoured; a longer one blocks this long and is counted (never a silent freeze)
    max_retry_after_s: Optional[float] = 120.0
    # the most pacing margin learned from short 429s (see `report_429`); decays by `slack_decay` per settled call
    max_slack_s: float = 0.25
    slack_decay: float = 0.9998
    clock: Callable[[], float] = time.monotonic
    # added to each interval of the admission gate (`admit`): the spread of the trip from being let go to reaching
    # the provider (an actor reply, then the HTTP send)
    admit_margin_s: float = 0.002
    gate_slack_decay: float = 0.995
    # state
    slack_s: float = field(default=0.0, init=False)  # learned: added to each paced interval
    _admit_at: float = field(default=0.0, init=False)  # earliest time the next token-limited call may be let go
    admits: int = field(default=0, init=False)
    admit_waits: int = field(default=0, init=False)  # times a call at the gate was told to wait
    late_sends: int = field(default=0, init=False)  # gated calls that left late enough to move the next one
    _next_req: float = field(default=0.0, init=False)  # earliest time the next request may start (GCRA TAT)
    _next_tok: float = field(default=0.0, init=False)
    _blocked_until: float = field(default=0.0, init=False)
    reserved: int = field(default=0, init=False)
    tokens_reserved: int = field(default=0, init=False)
    tokens_used: int = field(default=0, init=False)
    spent_usd: float = field(default=0.0, init=False)
    n_429: int = field(default=0, init=False)
    backoff_s_total: float = field(default=0.0, init=False)
    retry_after_capped: int = field(default=0, init=False)  # waits asked for beyond max_retry_after_s
    corrections: int = field(default=0, init=False)  # times the provider's remaining-* moved our schedule
    learned: dict = field(default_factory=dict, init=False)  # limits learned from x-ratelimit-limit-* headers
    longest_retry_after_s: float = field(default=0.0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def configure(self, rpm: Optional[float] = None, tpm: Optional[float] = None,
                  budget_usd: Optional[float] = None) -> None:
        with self._lock:
            self.rpm, self.tpm, self.budget_usd = rpm, tpm, budget_usd

    def budget_left(self) -> Optional[float]:
        return None if self.budget_usd is None else self.budget_usd - self.spent_usd

    def reserve(self, tokens: int = 0) -> float:
        """Reserve one request and `tokens` tokens; return seconds to wait before sending (>= 0)."""
        with self._lock:
            now = self.clock()
            start = max(now, self._blocked_until)
            if self.rpm:
                interval = 60.0 / self.rpm + self.slack_s
                # GCRA: a request may start once the theoretical arrival time minus the burst allowance has passed
                start = max(start, self._next_req - self.burst_s)
                self._next_req = max(self._next_req, start) + interval
            if self.tpm and tokens:
                tok_interval = 60.0 * tokens / self.tpm + self.slack_s + self.admit_margin_s  # as the gate spaces
                start = max(start, self._next_tok - self.burst_s)
                self._next_tok = max(self._next_tok, start) + tok_interval
            self.reserved += 1
            self.tokens_reserved += int(tokens)
            return max(0.0, start - now)

    def admit(self, tokens: int = 0) -> float:
        """The gate a token-limited call passes right before it is sent (after its reserved slot): 0 = go now (its
        tokens are counted from now), else the seconds to wait before asking again. It applies the provider's own
        rule to the times calls are really let go, not the ones planned: a provider whose bucket holds less than
        one call admits a call only once the tokens of the one before have refilled, counted from when that one
        reached it, so a call let go late must move the next one, which a schedule handed out ahead cannot do (a
        late send is not banked by such a bucket: the next planned slot would then be early, a 429). No burst is
        assumed (a provider's bucket size is not published). Without a token limit it never waits."""
        with self._lock:
            now = self.clock()
            if not (self.tpm and tokens):
                return 0.0
            if now < self._admit_at:
                self.admit_waits += 1
                return self._admit_at - now
            self._admit_at = now + 60.0 * tokens / self.tpm + self.slack_s + self.admit_margin_s
            self.slack_s *= self.gate_slack_decay
            self.admits += 1
            return 0.0

    def sent(self, tokens: int = 0, age_s: float = 0.0) -> None:
        """A call let through the gate really left `age_s` ago: the next one may leave one interval after that, not
        after the time it was let through (a call whose process was busy when the gate opened leaves late, and a
        bucket smaller than one call banks nothing of it)."""
        with self._lock:
            if not (self.tpm and tokens):
                return
            nxt = self.clock() - max(0.0, age_s) + 60.0 * tokens / self.tpm + self.slack_s + self.admit_margin_s
            if nxt > self._admit_at:
                self._admit_at = nxt
                self.late_sends += 1

    def settle(self, reserved: int, used: int, cost_usd: float = 0.0, headers: Optional[dict] = None,
               age_s: float = 0.0) -> None:
        """After a reply: account the spend (and return unused reserved tokens when refund_unused). `headers`: the
        reply's x-ratelimit-* headers, sent `age_s` ago: see `correct_from_headers`."""
        with self._lock:
            self.slack_s *= self.slack_decay
            self.tokens_used += int(used)
            self.spent_usd += float(cost_usd)
            if self.refund_unused and self.tpm and reserved > used:
                self._next_tok -= 60.0 * (reserved - used) / self.tpm
                self._next_tok = max(self._next_tok, self.clock() - self.burst_s)
            if headers:
                self._correct(headers, reserved, age_s)

    def correct_from_headers(self, headers: dict, reserved: int = 0, age_s: float = 0.0) -> None:
        with self._lock:
            self._correct(headers, reserved, age_s)

    def _correct(self, headers: dict, reserved: int, age_s: float) -> None:
        """The provider's own count, as of admitting a request about `age_s` ago. Limits not given are learned
        from `x-ratelimit-limit-*`. If `x-ratelimit-remaining-*` says less is left than the next call needs (one
        request; `reserved` tokens), the next slot moves to when the provider will have it: a provider counting
        differently from our estimate converges to its rule instead of answering 429s (lock held)."""
        h = {str(k).lower(): v for k, v in headers.items()}

        def num(v):
            try:
                return float(v)
            except (TypeError, ValueError):
                return None

        admitted = self.clock() - max(0.0, age_s)
        for kind, attr, nxt, need in (("requests", "rpm", "_next_req", 1.0), ("tokens", "tpm", "_next_tok",
                                                                                 float(reserved))):
            lim, rem = num(h.get(f"x-ratelimit-limit-{kind}")), num(h.get(f"x-ratelimit-remaining-{kind}"))
            if lim and getattr(self, attr) is None:
                setattr(self, attr, lim)
                self.learned[attr] = lim
            rate = getattr(self, attr)
            if rate and rem is not None and need and rem < need:
                ready = admitted + (need - rem) * 60.0 / rate
                if ready > getattr(self, nxt) - self.burst_s:  # our next start (GCRA: TAT - burst) is earlier
                    self.corrections += 1
                    setattr(self, nxt, ready + self.burst_s)
                if kind == "tokens" and ready + self.admit_margin_s > self._admit_at:  # the gate too
                    self._admit_at = ready + self.admit_margin_s

    def report_429(self, retry_after_s: Optional[float] = None, headers: Optional[dict] = None) -> float:
        """A provider said 'too many requests': block everyone until its reset. Returns the block length (s)."""
        with self._lock:
            wait = headers_backoff(headers)
            if wait is None:
                wait = retry_after_s
            if wait is None:
                wait = 60.0 / self.rpm if self.rpm else 1.0
            wait = self._cap(wait)
            if 0 < wait <= self.max_slack_s and (self.rpm or self.tpm):
                # a short wait: the call came a little early for a provider bucket that had to be (nearly) full,
                # i.e. our send times jitter by about this much. Space later calls by it (a few % of the limit at
                # most; a bucket holding several calls never answers these, so this stays 0 there)
                # behind the admission gate (a token limit) what is left is the spread of the trip from gate to
                # provider: a long one-off (a new connection's handshake) must not slow every later call, so the
                # margin at most doubles (+2 ms) per 429 and decays by `gate_slack_decay` per admitted call
                step = min(wait, self.slack_s + 0.002) if self.tpm else wait
                self.slack_s = min(self.max_slack_s, self.slack_s + step)
            now = self.clock()
            until = now + max(0.0, wait)
            if until > self._blocked_until:
                self.backoff_s_total += until - max(now, self._blocked_until)
                self._blocked_until = until
            self.n_429 += 1
            return wait

    def _cap(self, wait: float) -> float:
        """Cap a provider-requested wait at max_retry_after_s, counting the capped ones (lock held)."""
        self.longest_retry_after_s = max(self.longest_retry_after_s, float(wait))
        if self.max_retry_after_s is not None and wait > self.max_retry_after_s:
            self.retry_after_capped += 1
            return float(self.max_retry_after_s)
        return float(wait)

    def observe_headers(self, headers: Optional[dict]) -> None:
        """Headers of a successful reply: if the provider reports nothing left, wait for its reset."""
        wait = headers_backoff({k: v for k, v in (headers or {}).items()
                                if str(k).lower().startswith("x-ratelimit")})
        if wait:
            with self._lock:
                wait = self._cap(wait)
                self._blocked_until = max(self._blocked_until, self.clock() + wait)

    def stats(self) -> dict:
        with self._lock:
            return {"rpm": self.rpm, "tpm": self.tpm, "reserved": self.reserved,
                    "tokens_reserved": self.tokens_reserved, "tokens_used": self.tokens_used,
                    "spent_usd": round(self.spent_usd, 8), "budget_usd": self.budget_usd,
                    "n_429": self.n_429, "backoff_s_total": round(self.backoff_s_total, 3),
                    "retry_after_capped": self.retry_after_capped, "corrections": self.corrections,
                    "learned": dict(self.learned),
                    "longest_retry_after_s": round(self.longest_retry_after_s, 3),
                    "slack_ms": round(self.slack_s * 1000, 2), "admits": self.admits,
                    "admit_waits": self.admit_waits, "late_sends": self.late_sends,
                    "max_retry_after_s": self.max_retry_after_s,
                    "blocked_for_s": round(max(0.0, self._blocked_until - self.clock()), 3)}

def node_id() -> Optional[str]:
    """This process's Ray node id (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - no node id: callers use the relative wait
        return None



class RateLimiter:
    """Ray actor (async methods) holding the one TokenBucket for a limit key. Create it with
    `get_or_create_limiter`; every teacher actor on every node calls the same instance."""

    def __init__(self, rpm: Optional[float] = None, tpm: Optional[float] = None, burst_s: float = 0.0,
                 budget_usd: Optional[float] = None, owner_ttl_s: Optional[float] = None):
        self.bucket = TokenBucket(rpm=rpm, tpm=tpm, burst_s=burst_s, budget_usd=budget_usd)
        if owner_ttl_s is not None:
            self.OWNER_TTL_S = float(owner_ttl_s)
        self.stopped: Optional[str] = None  # set by stop(): every later acquire is refused with this reason
        self.held_usd = 0.0  # estimated cost of calls in flight, held against the budget
        self.owners: dict[str, dict] = {}  # owner -> {rpm, tpm, seen}: the limits each job / replica asked for
        self.node_id = node_id()  # callers on this node sleep until `start_at` (see `acquire`)

    # an owner that neither renewed nor unregistered (a crashed job) stops counting after this; a live one renews
    # (OwnerLease, every third of it)
    OWNER_TTL_S = 900.0

    def _apply_owners(self) -> None:
        now = time.time()
        self.owners = {k: v for k, v in self.owners.items() if now - v["seen"] <= self.OWNER_TTL_S}
        if not self.owners:
            return  # nobody left asking: keep the last limits
        def strictest(kind):
            vals = [v[kind] for v in self.owners.values() if v[kind]]
            return min(vals) if vals else None
        self.bucket.configure(strictest("rpm"), strictest("tpm"), self.bucket.budget_usd)

    async def register(self, owner: str, rpm: Optional[float] = None, tpm: Optional[float] = None,
                       max_retry_after_s: Optional[float] = None) -> dict:
        """A job or replica asks for limits (re-registering renews it). The stricter limit of all live owners
        applies. Returns {'rpm', 'tpm', 'conflict': None | a sentence naming what another owner asked for}."""
        others = {k: v for k, v in self.owners.items() if k != owner}
        conflict = []
        for kind, mine in (("rpm", rpm), ("tpm", tpm)):
            theirs = sorted({v[kind] for v in others.values() if v[kind]})
            if mine and theirs and any(t != mine for t in theirs):
                conflict.append(f"{kind} {mine:g} asked, another job on this endpoint asked "
                                + "/".join(f"{t:g}" for t in theirs))
        self.owners[owner] = {"rpm": rpm, "tpm": tpm, "seen": time.time()}
        if max_retry_after_s is not None:
            self.bucket.max_retry_after_s = max_retry_after_s
        self._apply_owners()
        msg = None
        if conflict:
            msg = "; ".join(conflict) + f"; the stricter applies (rpm {self.bucket.rpm}, tpm {self.bucket.tpm})"
        return {"rpm": self.bucket.rpm, "tpm": self.bucket.tpm, "conflict": msg}

    async def unregister(self, owner: str) -> None:
        """The owner is done: its limits no longer count (the others' apply)."""
        self.owners.pop(owner, None)
        self._apply_owners()

    async def configure(self, rpm: Optional[float] = None, tpm: Optional[float] = None,
                        budget_usd: Optional[float] = None) -> None:
        self.bucket.configure(rpm, tpm, budget_usd)

    async def reserve(self, tokens: int = 0) -> float:
        """Seconds the caller must wait before sending a call that may use `tokens` tokens."""
        return self.bucket.reserve(tokens)

    async def acquire(self, tokens: int = 0, est_cost_usd: float = 0.0) -> dict:
        """Like reserve, plus the stop flag and the budget check:
        {'wait_s': float, 'start_at': wall-clock time to send, 'node': this actor's node, 'stop': None | reason,
        'kind': None | 'budget' | 'stopped'}. A caller on the same node sleeps until `start_at` (one clock: the
        reply's variable trip back does not shift its send time, so sends keep the limiter's spacing); elsewhere
        it sleeps `wait_s` (clocks of two nodes may differ). The estimated cost is held against the budget until
        `settle` replaces it with the real cost."""
        if self.stopped:
            return {"wait_s": 0.0, "stop": self.stopped, "kind": "stopped"}
        left = self.bucket.budget_left()
        if left is not None:
            if left - self.held_usd - est_cost_usd < 0:
                return {"wait_s": 0.0, "stop": f"budget of ${self.bucket.budget_usd:.4f} reached", "kind": "budget"}
            self.held_usd += est_cost_usd
        wait = self.bucket.reserve(tokens)
        return {"wait_s": wait, "start_at": time.time() + wait, "node": self.node_id, "stop": None, "kind": None,
                "admit": bool(self.bucket.tpm and tokens)}  # then pass `admit` right before sending

    async def acquire_many(self, items: list) -> list[dict]:
        """`acquire` for each (tokens, est_cost_usd) of `items`, in order, in one round trip (what `AcquireBatcher`
        sends: the acquisitions a client made while its previous round trip was in flight)."""
        return [await self.acquire(int(t), float(c)) for t, c in items]

    async def acquire_block(self, n: int, tokens: int = 0, est_cost_usd: float = 0.0) -> dict:
        """`n` acquisitions in one round trip (a client leasing a small block of slots at high rates):
        {'waits': [seconds before each may be sent], 'stop', 'kind'}; the budget holds n x est_cost_usd."""
        if self.stopped:
            return {"waits": [], "stop": self.stopped, "kind": "stopped"}
        left = self.bucket.budget_left()
        if left is not None:
            if left - self.held_usd - n * est_cost_usd < 0:
                return {"waits": [], "stop": f"budget of ${self.bucket.budget_usd:.4f} reached", "kind": "budget"}
            self.held_usd += n * est_cost_usd
        return {"waits": [self.bucket.reserve(tokens) for _ in range(n)], "stop": None, "kind": None}

    async def admit(self, tokens: int = 0) -> float:
        """TokenBucket.admit: 0 = send now, else wait that long and ask again."""
        return self.bucket.admit(tokens)

    async def sent(self, tokens: int = 0, age_s: float = 0.0) -> None:
        """TokenBucket.sent: a gated call really left (sent without waiting for an answer)."""
        self.bucket.sent(tokens, age_s)

    async def stop(self, reason: str) -> None:
        """Refuse every later call (a fatal error such as a bad key: stop the whole job at once)."""
        self.stopped = reason

    async def release(self, est_cost_usd: float = 0.0) -> None:
        """Drop a budget hold without spending (the call failed before a reply)."""
        self.held_usd = max(0.0, self.held_usd - est_cost_usd)

    async def settle(self, reserved: int = 0, used: int = 0, cost_usd: float = 0.0, est_cost_usd: float = 0.0,
                     headers: Optional[dict] = None, age_s: float = 0.0) -> None:
        self.held_usd = max(0.0, self.held_usd - est_cost_usd)
        self.bucket.settle(reserved, used, cost_usd, headers, age_s)

    async def report_429(self, retry_after_s: Optional[float] = None, headers: Optional[dict] = None) -> float:
        return self.bucket.report_429(retry_after_s, headers)

    async def observe_headers(self, headers: Optional[dict] = None) -> None:
        self.bucket.observe_headers(headers)

    async def stats(self) -> dict:
        self._apply_owners()
        return {**self.bucket.stats(), "stopped": self.stopped, "held_usd": round(self.held_usd, 8),
                "owners": {k: {"rpm": v["rpm"], "tpm": v["tpm"]} for k, v in self.owners.items()},
                "owner_ttl_s": self.OWNER_TTL_S}


