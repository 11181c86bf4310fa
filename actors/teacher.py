"""The teacher: one OpenAI-compatible chat client with limits, retries, a durable cache and accounting.

`TeacherClient` is a plain async class (usable in Ray Serve deployments, Ray Data actors, or a script):

    client = TeacherClient("gpt-3.5-turbo", base_url="http://127.0.0.1:8300/v1", api_key_env="OPENAI_API_KEY",
                           limiter=get_or_create_limiter(...), cache_dir="out/cache")
    res = await client.chat(messages, temperature=0.7, max_tokens=512, sample_index=0, template_id="paper_qg")
    res.text, res.prompt_tokens, res.completion_tokens, res.cost_usd, res.attempts, res.cached

- Calls go through the real `openai.AsyncOpenAI` SDK (its own retries off: tenacity owns them).
- Before each attempt it reserves capacity from the cluster limiter (actors.limiter): one RPC, then a sleep.
  A 429 is reported to the limiter, which backs every caller off until the provider's reset.
- Retries: jittered exponential backoff (tenacity) for 429, 5xx, timeouts, connection errors and replies that
  fail `validate` (re-sampled). Other 4xx fail at once (`TeacherAuthError` for 401/403, `TeacherRequestError`
  with the provider's message and code; `.fatal` only for an unknown model) naming the upstream and the status. After the attempts run out: `TeacherUnavailableError`.
- The API key is read from the environment variable NAMED by `api_key_env`; it never appears in logs,
  exceptions, results or cache files (upstream messages are redacted before they are raised).
- Durable cache: content-addressed (endpoint, model, messages, temperature, max_tokens, sample index, template id)
  files; a hit is used only when its recorded endpoint and model match,
  `<cache_dir>/<key[:2]>/<key>.json`, written atomically after a good reply, so a resumed job pays only for the
  calls that were in flight. The key is also sent as header `x-subq-cache-key` (and the sample index as
  `x-subq-sample-index`), which the local teacher server counts and uses for replay; providers ignore them.

`TeacherActor` is the Ray Data actor-pool UDF built on it
(`map_batches(TeacherActor, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4), ...)`):
every row of a batch is processed concurrently on the actor's event loop; subclasses override `process`.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from typing import Any, Callable, Optional

from actors.cache import RequestCache, cache_key, normalize_endpoint, refuse_userinfo
from actors.errors import (
    _KEYLIKE,
    _upstream_code,
    _upstream_message,
    TeacherAuthError,
    TeacherBudgetExceeded,
    TeacherError,
    TeacherMalformedError,
    TeacherRequestError,
    TeacherStopped,
    TeacherUnavailableError,
)
from actors.metrics import TeacherMetrics, _MeteredStats
from subq.costs import Price, PriceTable, estimate_tokens
from actors.billing import BILLING, ChatResult, _bill

# what lived here before the split (actors.errors, actors.cache, actors.metrics), still importable from here
__all__ = ["BILLING", "ChatResult", "RequestCache", "TeacherActor", "TeacherAuthError", "TeacherBudgetExceeded",
           "TeacherClient", "TeacherError", "TeacherMalformedError", "TeacherRequestError", "TeacherStopped",
           "TeacherUnavailableError", "cache_key", "normalize_endpoint", "refuse_userinfo"]

# ------------------------------------------------------------------ errors


class _Retryable(Exception):
    def __init__(self, reason: str, status: Optional[int] = None, maybe_billed: bool = False,
                 billed_usd: Optional[float] = None):
        super().__init__(reason)
        self.reason, self.status = reason, status
        self.maybe_billed = maybe_billed  # the request reached the provider, which may bill it (timeout, drop, bad 200)
        self.billed_usd = billed_usd  # a reply arrived with its usage (billed, then retried): what it cost


# called by httpx right before a request of this task goes out, after the openai SDK built it (its first request in
# a process spends ~45 ms there: a gated call is counted from its real send, not from when it was let through)
_ON_SEND: contextvars.ContextVar[Optional[Callable[[], None]]] = contextvars.ContextVar("subq_on_send", default=None)


async def _on_send(request) -> None:
    fn = _ON_SEND.get()
    if fn is not None:
        fn()


# ------------------------------------------------------------------ the client


class TeacherClient:
    """Async OpenAI-compatible chat client: limiter, retries, cache, tokens and cost. See the module docstring."""

    def __init__(
        self,
        model: str,
        base_url: Optional[str] = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        api_key: Optional[str] = None,
        limiter: Any = None,
        budget: Any = None,
        rpm: Optional[float] = None,
        tpm: Optional[float] = None,
        max_retries: int = 6,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        timeout_s: float = 60.0,
        price: Price | PriceTable | None = None,
        cache_dir: Optional[str] = None,
        max_concurrency: int = 64,
        max_resamples: int = 2,
        max_retry_after_s: float = 120.0,
        limiter_name: Optional[str] = None,
        limits_owner: Optional[str] = None,
        lease_every_s: Optional[float] = None,
    ):
        """Limits: given a shared `limiter` (a job's teacher actor), `rpm`/`tpm` are the job's, owned by
        `limits_owner` (the job driver's OwnerLease renews them); this client registers them under that owner only
        if it must create the limiter again. Without a limiter and with rpm/tpm (a Serve replica's solver), the
        client holds its own OwnerLease (renewed every `lease_every_s`, default a third of the owner TTL) on the
        endpoint's shared limiter until `close()` or its process ends."""
        refuse_userinfo(base_url)
        self.model = model
        self.base_url = base_url or "https://api.openai.com/v1"
        self.api_key_env = api_key_env
        self._key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.max_resamples = max_resamples
        self.max_retry_after_s = max_retry_after_s
        self.limiter_name = limiter_name  # to find the shared limiter again if its actor is lost
        self._limits = (rpm, tpm)
        self._owner = limits_owner  # whose limits these are on the shared limiter
        self._lease = None  # this client's own OwnerLease (no job lease to rely on)
        if isinstance(price, Price):
            self.price = price
        else:
            self.price = (price or PriceTable()).price(model)  # ConfigError naming 'model' when unpriced
        self.cache = RequestCache(cache_dir) if cache_dir else None
        self.limiter = limiter
        self.budget = budget  # optional RateLimiter actor holding the job's budget and stop flag
        if limiter is None and (rpm or tpm):
            self.limiter = self._make_limiter(rpm, tpm, lease_every_s)
        self.fatal: Optional[str] = None  # set after a fatal error: later calls are refused (TeacherStopped)
        self._sem: Optional[asyncio.Semaphore] = None
        self._batcher = None  # actors.limiter.AcquireBatcher, made on the first acquisition (in the event loop)
        self._node: Any = False  # this process's Ray node id, looked up on the first shared-limiter acquisition
        self._last_wait = 0.0  # the wait of the latest slot: paced when > SLOT_HORIZON_S (see `_acquire`)
        self._far_gate: Optional[asyncio.Semaphore] = None
        self._gate = False  # the limiter asked for its admission gate (a token limit): see `_admit`
        self._warm, self._warm_lock = False, None  # see `_warm_up`
        self._max_concurrency = max_concurrency
        self._client = None
        self.metrics = TeacherMetrics(self.base_url, model)
        self._in_flight = 0
        self.stats = _MeteredStats(self.metrics, {"calls": 0, "retries": 0, "limiter_wait_s": 0.0, "attempts": 0, "cache_hits": 0, "n_429": 0, "n_5xx": 0, "timeouts": 0,
                      "connection_errors": 0, "malformed": 0, "cache_mismatch": 0, "maybe_billed": 0,
                      "maybe_billed_usd": 0.0, "retry_after_capped": 0, "prompt_tokens": 0, "completion_tokens": 0,
                      "cost_usd": 0.0})

    def _make_limiter(self, rpm, tpm, every_s: Optional[float] = None):
        try:
            import ray

            if ray.is_initialized():
                from actors.limiter_client import OwnerLease, account_id, default_owner, limiter_name

                self.limiter_name = self.limiter_name or limiter_name(self.base_url, self.model, account_id(self._key))
                self._lease = OwnerLease(self.limiter_name, default_owner(), rpm, tpm, every_s=every_s, block=False)
                self._owner = self._lease.owner
                return self._lease.actor
        except ImportError:
            pass
        from actors.limiter import TokenBucket

        return TokenBucket(rpm=rpm, tpm=tpm)

    def __repr__(self) -> str:  # never shows the key
        return f"TeacherClient(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def _redact(self, text: str) -> str:
        if self._key:
            text = text.replace(self._key, "***")
        return _KEYLIKE.sub("sk-***", text)

    def _openai(self):
        if self._client is None:
            import openai

            if not self._key:
                raise TeacherAuthError(f"no API key: set the environment variable {self.api_key_env}",
                                       upstream=self.base_url, status=None,
                                       hint="for a local server any non-empty value works")
            # openai's own httpx client, plus a hook at the moment httpx sends a request (see `_ON_SEND`)
            self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._key, max_retries=0,
                                              timeout=self.timeout_s, http_client=openai.DefaultAsyncHttpxClient(
                                                  timeout=self.timeout_s, event_hooks={"request": [_on_send]}))
        return self._client

    FAR_SLOTS = 1  # paced: this client's calls holding a slot more than SLOT_HORIZON_S ahead (see `_acquire`)
    SLOT_HORIZON_S = 0.5

    # -- limiter, works with a Ray actor handle, a local TokenBucket or None
    async def _acquire(self, tokens: int, est_cost: float) -> None:
        if self.fatal:
            raise TeacherStopped(self.fatal, upstream=self.base_url)
        if self.budget is not None:
            res = await self.budget.acquire.remote(0, est_cost)
            if res["stop"]:
                cls = TeacherBudgetExceeded if res["kind"] == "budget" else TeacherStopped
                raise cls(res["stop"], upstream=self.base_url)
        lim = self.limiter
        if lim is None:
            return
        # Paced (the last slot was more than SLOT_HORIZON_S away): at most FAR_SLOTS of this client's calls hold
        # a slot that far ahead; the others wait here before asking. Slots are then given out only a little ahead,
        # so what the limiter learns (the provider's remaining-* headers as of a late send, the pacing margin)
        # moves the slots that follow instead of the ones after a long queue. Unpaced, nothing waits here.
        gate = None
        if self._last_wait > self.SLOT_HORIZON_S:
            if self._far_gate is None:
                self._far_gate = asyncio.Semaphore(self.FAR_SLOTS)
            gate = self._far_gate
            await gate.acquire()
        try:
            if hasattr(lim, "acquire") and hasattr(lim.acquire, "remote"):
                if self._batcher is None:  # acquisitions made while one is on its way go together in the next
                    from actors.limiter_client import AcquireBatcher

                    self._batcher = AcquireBatcher(lambda items: self._remote("acquire_many", items))
                res = await self._batcher.acquire(tokens, 0.0)
                if res["stop"]:
                    cls = TeacherBudgetExceeded if res["kind"] == "budget" else TeacherStopped
                    raise cls(res["stop"], upstream=self.base_url)
                from actors.limiter import node_id
                from actors.limiter_client import start_delay

                if self._node is False:
                    self._node = node_id()
                wait = start_delay(res, self._node)
                self._gate = bool(res.get("admit"))
            else:
                wait = lim.reserve(tokens)
                self._gate = bool(lim.tpm and tokens)
            self._last_wait = wait
            deadline = time.monotonic() + wait
            if wait > 0:
                self.stats["limiter_wait_s"] += wait
            if gate is not None and wait > self.SLOT_HORIZON_S:
                await asyncio.sleep(wait - self.SLOT_HORIZON_S)
        finally:
            if gate is not None:
                gate.release()
        if deadline > time.monotonic():
            await asyncio.sleep(deadline - time.monotonic())

    async def _warm_up(self, client) -> None:
        """Before this client's first token-limited call: one GET /models, so its first chat call does not leave
        tens of ms after the gate let it through (a new connection, the SDK's first request) while the next call,
        from a warm process, leaves on time: against a bucket smaller than one call that next one is a 429."""
        if self._warm_lock is None:
            self._warm_lock = asyncio.Lock()
        async with self._warm_lock:
            if not self._warm:
                try:
                    await client.models.list()
                except Exception:  # noqa: BLE001 - only a warm-up: the call itself reports what is wrong
                    pass
                self._warm = True

    async def _admit(self, tokens: int) -> None:
        """Right before sending a token-limited call: the limiter's gate (TokenBucket.admit), asked again after
        each wait it gives, so calls reach the provider spaced by their tokens from when they were really let go."""
        if not self._gate or self.limiter is None:
            return
        for _ in range(1000):
            wait = await self._limiter_call("admit", tokens)
            if not wait or wait <= 0:
                return
            self.stats["limiter_wait_s"] += wait
            await asyncio.sleep(wait)

    async def _limiter_call(self, method: str, *args) -> Any:
        lim = self.limiter
        if lim is None:
            return None
        fn = getattr(lim, method)
        if hasattr(fn, "remote"):
            return await self._remote(method, *args)
        return fn(*args)

    async def _remote(self, method: str, *args) -> Any:
        """A call on the shared limiter actor; if that actor is gone for good (its node was lost), find or create
        it again by name with this client's limits, and call once more."""
        import ray

        try:
            return await getattr(self.limiter, method).remote(*args)
        except ray.exceptions.RayActorError:
            if not self.limiter_name:
                raise
            from actors.limiter_client import reattach_limiter

            self.limiter = await reattach_limiter(self.limiter_name, self._owner, *self._limits)
            if self._lease is not None:
                self._lease.actor = self.limiter
            return await getattr(self.limiter, method).remote(*args)

    # -- one call
    async def chat(self, messages: list[dict], *, temperature: float = 0.7, max_tokens: int = 512,
                   sample_index: int = 0, template_id: Optional[str] = None,
                   validate: Optional[Callable[[str], Optional[str]]] = None,
                   accept_invalid: bool = False) -> ChatResult:
        """One chat completion. `validate(text)` returns None for a usable reply or a reason; unusable replies
        are re-sampled up to `max_resamples` times, then raise TeacherMalformedError (or, with
        `accept_invalid`, the last reply is returned with `invalid_reason` set)."""
        key = cache_key(self.model, messages, temperature, max_tokens, sample_index, template_id, self.base_url)
        self.stats["calls"] += 1
        if self.cache is not None:
            hit = await asyncio.to_thread(self.cache.get, key)
            if hit is not None and not RequestCache.matches(hit, self.base_url, self.model):
                self.stats["cache_mismatch"] += 1
                hit = None
            if hit is not None:
                self.stats["cache_hits"] += 1
                return ChatResult(hit["text"], hit["prompt_tokens"], hit["completion_tokens"], hit["cost_usd"],
                                  attempts=0, cached=True, key=key, model=self.model,
                                  provenance=hit.get("provenance"), invalid_reason=hit.get("invalid_reason"))
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._max_concurrency)
        async with self._sem:
            self._in_flight += 1
            self.metrics.set_in_flight(self._in_flight)
            try:
                res = await self._call_with_retries(messages, temperature, max_tokens, sample_index, key, validate,
                                                    accept_invalid, template_id)
            finally:
                self._in_flight -= 1
                self.metrics.set_in_flight(self._in_flight)
        if self.cache is not None:
            entry = {k: v for k, v in res.to_dict().items() if k not in ("raw_headers", "cached", "attempts")}
            entry.update(template_id=template_id, sample_index=sample_index, created=time.time(),
                         endpoint=normalize_endpoint(self.base_url))
            await asyncio.to_thread(self.cache.put, key, entry)
        return res

    async def _call_with_retries(self, messages, temperature, max_tokens, sample_index, key, validate,
                                 accept_invalid, template_id=None) -> ChatResult:
        from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_attempt, \
            wait_random_exponential

        state = {"attempts": 0, "n_429": 0, "resamples": 0, "last_invalid": None, "tid": template_id}
        est_tokens = sum(estimate_tokens(m.get("content") or "") for m in messages) + max_tokens
        est_cost = self.price.cost(est_tokens - max_tokens, max_tokens)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_random_exponential(multiplier=self.backoff_initial_s, max=self.backoff_max_s),
            retry=retry_if_exception_type(_Retryable),
            reraise=False,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    res = await self._attempt(messages, temperature, max_tokens, sample_index, key, est_tokens,
                                              est_cost, state)
                    reason = validate(res.text) if validate else None
                    if reason is None:
                        return res
                    self.stats["malformed"] += 1
                    state["last_invalid"] = (res, reason)
                    if state["resamples"] >= self.max_resamples:
                        if accept_invalid:
                            res.invalid_reason = reason
                            return res
                        raise TeacherMalformedError(f"{state['resamples'] + 1} replies failed validation: {reason}",
                                                    upstream=self.base_url, status=200)
                    state["resamples"] += 1
                    raise _Retryable(f"unusable reply ({reason})", 200)
        except RetryError as e:
            last = e.last_attempt.exception()
            if state["last_invalid"] is not None and accept_invalid and isinstance(last, _Retryable) and last.status == 200:
                res, reason = state["last_invalid"]
                res.invalid_reason = reason
                return res
            reason = last.reason if isinstance(last, _Retryable) else repr(last)
            raise TeacherUnavailableError(
                self._redact(f"gave up after {state['attempts']} attempts; last error: {reason}"),
                upstream=self.base_url, status=getattr(last, "status", None),
                hint="check that the endpoint is up, or raise --max-retries") from None
        raise AssertionError("unreachable")

    async def _attempt(self, messages, temperature, max_tokens, sample_index, key, est_tokens, est_cost,
                       state) -> ChatResult:

        client = self._openai()
        await self._acquire(est_tokens, est_cost)
        if self._gate and not self._warm:
            await self._warm_up(client)
        await self._admit(est_tokens)
        state["attempts"] += 1
        self.stats["attempts"] += 1
        if state["attempts"] > 1:
            self.stats["retries"] += 1
        state["sent"], state["replied"] = False, None
        try:
            res = await self._send(client, messages, temperature, max_tokens, sample_index, key, est_tokens, state)
        except _Retryable as e:
            if e.billed_usd is not None:  # a reply arrived (billed, counted in _send) and is retried
                if self.budget is not None:
                    await self.budget.settle.remote(0, 0, e.billed_usd, est_cost)
            elif e.maybe_billed:  # the provider may have billed it: charge the hold, count it apart
                await self._maybe_billed(est_cost)
            elif self.budget is not None:
                await self.budget.release.remote(est_cost)
            raise
        except asyncio.CancelledError:  # cancelled in flight (a sibling failed): the provider may bill it
            try:
                if state.get("replied") is not None:  # its reply was billed and counted already
                    if self.budget is not None:
                        await self.budget.settle.remote(0, 0, state["replied"], est_cost)
                elif state["sent"]:
                    await self._maybe_billed(est_cost)
                elif self.budget is not None:
                    await self.budget.release.remote(est_cost)
            except BaseException:  # cancelled again while counting: the cancellation wins
                pass
            raise
        except BaseException:
            if self.budget is not None:
                await self.budget.release.remote(est_cost)
            raise
        if self.budget is not None:
            await self.budget.settle.remote(0, 0, res.cost_usd, est_cost)
        return res

    async def _maybe_billed(self, est_cost: float) -> None:
        self.stats["maybe_billed"] += 1
        self.stats["maybe_billed_usd"] += est_cost
        acc = BILLING.get()
        if acc is not None:
            acc["maybe_billed"] = acc.get("maybe_billed", 0) + 1
            acc["maybe_billed_usd"] = acc.get("maybe_billed_usd", 0.0) + est_cost
        await self._limiter_call("settle", 0, 0, est_cost)
        if self.budget is not None:
            await self.budget.settle.remote(0, 0, est_cost, est_cost)

    async def _send(self, client, messages, temperature, max_tokens, sample_index, key, est_tokens,
                    state) -> ChatResult:
        import openai

        t_send = time.monotonic()
        state["sent"] = True
        on_send = None
        if self._gate and self.limiter is not None:  # the gate counts the next call from its real send
            lim = self.limiter

            def on_send() -> None:
                if hasattr(getattr(lim, "sent", None), "remote"):
                    lim.sent.remote(est_tokens, 0.0)  # one way: no answer awaited
                else:
                    lim.sent(est_tokens, 0.0)
        try:
            token = _ON_SEND.set(on_send)
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, temperature=temperature, max_tokens=max_tokens,
                    extra_headers={"x-subq-cache-key": key, "x-subq-sample-index": str(sample_index)})
            finally:
                _ON_SEND.reset(token)
            headers = dict(raw.headers)
            try:
                completion = raw.parse()
                text = completion.choices[0].message.content
                usage = completion.usage
            except Exception as e:  # body not JSON / not a chat completion
                self.stats["malformed"] += 1
                raise _Retryable(f"malformed response body: {type(e).__name__}", 200, maybe_billed=True) from None
        except openai.RateLimitError as e:
            state["n_429"] += 1
            self.stats["n_429"] += 1
            hdrs = dict(e.response.headers)
            from actors.limiter import headers_backoff

            wait = headers_backoff(hdrs)
            if self.limiter is not None:
                await self._limiter_call("report_429", wait, {k: v for k, v in hdrs.items()
                                                              if k.lower().startswith(("retry-after", "x-ratelimit"))})
            elif wait:  # no shared limiter: honour it here, up to the cap
                if wait > self.max_retry_after_s:
                    self.stats["retry_after_capped"] += 1
                await asyncio.sleep(min(wait, self.max_retry_after_s))
            await self._limiter_call("settle", est_tokens, 0, 0.0)
            raise _Retryable("HTTP 429 rate limited", 429) from None
        except openai.APITimeoutError:
            self.stats["timeouts"] += 1
            raise _Retryable(f"timed out after {self.timeout_s}s", maybe_billed=True) from None
        except openai.APIConnectionError as e:
            self.stats["connection_errors"] += 1
            # not connected = never sent; anything else (a dropped connection) may have been billed. By name: the
            # SDK may use its own copy of httpx
            sent = type(e.__cause__).__name__ not in ("ConnectError", "ConnectTimeout")
            raise _Retryable(self._redact(f"connection error: {e}"), maybe_billed=sent) from None
        except openai.APIStatusError as e:
            status = e.status_code
            msg = self._redact(_upstream_message(e))
            if status >= 500 or status in (408, 409):
                self.stats["n_5xx"] += 1
                raise _Retryable(f"HTTP {status}: {msg}", status) from None
            if status in (401, 403):
                raise TeacherAuthError(f"HTTP {status} (authentication/permission): {msg}", upstream=self.base_url,
                                       status=status, hint=f"check the key in ${self.api_key_env}") from None
            raise TeacherRequestError(f"HTTP {status}: {msg}", upstream=self.base_url, status=status,
                                      hint="check --model and the request parameters",
                                      code=_upstream_code(e)) from None
        except openai.APIError as e:  # e.g. a reply body the SDK cannot validate: treat like a bad sample
            self.stats["malformed"] += 1
            raise _Retryable(self._redact(f"unusable response: {type(e).__name__}"), 200, maybe_billed=True) from None
        # a reply arrived: the provider bills it, usable or not (counted before any validation or retry)
        pt = int(getattr(usage, "prompt_tokens", 0) or 0) if usage else estimate_tokens(str(messages))
        ct = int(getattr(usage, "completion_tokens", 0) or 0) if usage else estimate_tokens(text or "")
        cost = self.price.cost(pt, ct)
        self.stats["prompt_tokens"] += pt
        self.stats["completion_tokens"] += ct
        self.stats["cost_usd"] += cost
        _bill(pt, ct, cost, state.get("tid"))
        state["replied"] = cost
        rl = {k: v for k, v in headers.items() if k.lower().startswith("x-ratelimit")}
        lim = self.limiter
        if lim is not None and hasattr(getattr(lim, "settle", None), "remote"):
            await self._remote("settle", est_tokens, pt + ct, cost, 0.0, rl, time.monotonic() - t_send)
        else:
            await self._limiter_call("settle", est_tokens, pt + ct, cost, rl, time.monotonic() - t_send)
        if text is None:
            raise _Retryable("empty reply (no message content)", 200, billed_usd=cost)
        return ChatResult(text, pt, ct, cost, attempts=state["attempts"], cached=False, key=key, model=self.model,
                          provenance=getattr(completion, "system_fingerprint", None), n_429=state["n_429"],
                          raw_headers={k: v for k, v in headers.items() if k.lower().startswith(("x-ratelimit", "x-subq"))})

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._lease is not None:  # our limits stop counting (the limiter stays for the others)
            await asyncio.to_thread(self._lease.close)


# ------------------------------------------------------------------ Ray Data actor


class TeacherActor:
    """Ray Data actor-pool UDF holding one TeacherClient. Each batch's rows run concurrently on the actor's
    event loop (the client's semaphore caps calls in flight). The default `process` sends `row["messages"]`
    and returns the reply; generation subclasses it (pipelines.generate.GenerateActor)."""

    def __init__(self, client_kwargs: dict, limiter_name: Optional[str] = None, limiter_namespace: str = "subq",
                 api_key_ref: Optional[list] = None):
        """`api_key_ref`: [ObjectRef] of the key, put by the driver, for workers whose environment lacks the
        variable (the key travels in the object store, never in task specs, runtime_env or logs)."""
        import ray

        limiter = ray.get_actor(limiter_name, namespace=limiter_namespace) if limiter_name else None
        from cluster.submit import worker_key

        kwargs = dict(client_kwargs)
        key = worker_key(kwargs.get("api_key_env", "OPENAI_API_KEY"), api_key_ref)
        if key is not None:
            kwargs["api_key"] = key
        kwargs.setdefault("limiter_name", limiter_name)
        self.client = TeacherClient(**kwargs, limiter=limiter)

    async def process(self, row: dict) -> dict:
        res = await self.client.chat(list(row["messages"]), temperature=float(row.get("temperature", 0.7)),
                                     max_tokens=int(row.get("max_tokens", 512)))
        return {**row, "reply": res.text, "prompt_tokens": res.prompt_tokens,
                "completion_tokens": res.completion_tokens, "cost_usd": res.cost_usd}

    async def __call__(self, batch: dict) -> dict:
        n = len(next(iter(batch.values()))) if batch else 0
        rows = [{k: _py(v[i]) for k, v in batch.items()} for i in range(n)]
        outs = await asyncio.gather(*(self.process(r) for r in rows))
        keys = list(outs[0]) if outs else []
        return {k: [o.get(k) for o in outs] for k in keys}


def _py(v):
    """numpy scalars/arrays from a Ray Data batch -> plain Python."""
    if hasattr(v, "tolist"):
        return v.tolist()
    return v
