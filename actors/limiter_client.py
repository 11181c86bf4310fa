"""The limiter's client half: finding or creating the one shared limiter of an endpoint by name (detached, on the\ndriver's node), a job's or replica's limits on it for as long as it runs (OwnerLease: registered once, renewed,\nbrought back to a re-created limiter, unregistered at the end), and batched acquisitions (AcquireBatcher). The\nlimiter itself (TokenBucket, the RateLimiter actor) is actors.limiter."""

from __future__ import annotations

import re
import threading
import time
from typing import Callable, Optional

from actors.limiter import RateLimiter


class AcquireBatcher:
    """Group commit for one client's acquisitions: the first goes to the limiter at once; those that arrive while
    a round trip is in flight go together in the next one (`RateLimiter.acquire_many`). At low rates nothing
    waits longer than one round trip; at high rates one round trip carries many acquisitions, so the limiter
    actor is not the bottleneck (the issue-11 target: >= 10,000 acquisitions/s). Each caller gets its own result
    (its own wait and token reservation: no leased slot goes unused). `send(items) -> list[results]` is async."""

    def __init__(self, send: Callable, max_batch: int = 256):
        self.send, self.max_batch = send, max_batch
        self.pending: list = []
        self.running = False

    async def acquire(self, tokens: int = 0, est_cost_usd: float = 0.0) -> dict:
        import asyncio

        fut = asyncio.get_running_loop().create_future()
        self.pending.append(((tokens, est_cost_usd), fut))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
                try:
                    results = await self.send([item for item, _ in batch])
                except BaseException as e:  # noqa: BLE001 - handed to the callers of this batch
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, fut), res in zip(batch, results):
                    if not fut.done():
                        fut.set_result(res)
        finally:
            self.running = False



def start_delay(res: dict, node_id: Optional[str]) -> float:
    """Seconds to sleep before sending, from an `acquire` result: until its `start_at` when the caller is on the
    limiter's node (same clock), else its `wait_s`."""
    if node_id is not None and res.get("node") == node_id and res.get("start_at") is not None:
        return max(0.0, res["start_at"] - time.time())
    return res["wait_s"]


def account_id(api_key: Optional[str]) -> Optional[str]:
    """A short, one-way id of the account a key belongs to (providers limit per account): never the key."""
    if not api_key:
        return None
    import hashlib

    return hashlib.sha256(b"subq-account:" + api_key.encode()).hexdigest()[:10]


def limiter_name(base_url: Optional[str], model: str, account: Optional[str] = None) -> str:
    """The limit key: one limiter per (endpoint, model, account), as providers limit per organisation and model.
    `account` is `account_id(key)` (None: the name of older versions, shared by every key)."""
    host = re.sub(r"^https?://", "", base_url or "api.openai.com").rstrip("/")
    host = re.sub(r"^[^/@]*@", "", host)  # never credentials (user:password@) in an actor name anyone can list
    return f"subq-limiter:{host}:{model}" + (f":{account}" if account else "")


def on_driver_node(detached: bool = False) -> dict:
    """Actor options for the cluster limiter: on the creating driver's node (the head, for cluster jobs), never on
    a worker that the autoscaler may remove or spot may reclaim; a crashed limiter process restarts and the calls
    waiting on it are retried. A job-scoped limiter is pinned (it dies with its driver anyway; Ray's soft affinity
    was seen to place it elsewhere); a detached one, shared across jobs, is created again when that node is gone."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # hard affinity in both cases (Ray 2.60 was seen to ignore soft affinity); a detached limiter whose node is
    # gone is dead for good, and the next get_or_create_limiter creates it again under the same name
    return dict(max_restarts=-1, max_task_retries=-1, scheduling_strategy=NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=False))


def default_owner() -> str:
    """This process as a limiter owner (one per job driver or Serve replica)."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def get_or_create_limiter(name: str, rpm: Optional[float] = None, tpm: Optional[float] = None, *,
                          budget_usd: Optional[float] = None, burst_s: float = 0.0, detached: bool = True,
                          namespace: str = "subq", wait: bool = True, owner: Optional[str] = None,
                          owner_ttl_s: Optional[float] = None):
    """The one named RateLimiter actor for `name` (created if absent). Detached by default: it outlives the job
    or replica that created it, so every job on the endpoint keeps the same limiter (and a lost one is created
    again by the next call here). Limits given here are registered for `owner` (default: this process); the
    strictest limit of the live owners applies, never silently the latest. `detached=False`: job-scoped (dies
    with the driver). `wait=False` does not block on the registration (callers inside an event loop, e.g. a
    Serve replica)."""
    import ray

    opts = dict(name=name, namespace=namespace, get_if_exists=True, num_cpus=0, max_concurrency=1000,
                **on_driver_node(detached))
    if detached:
        opts["lifetime"] = "detached"
    actor = ray.remote(RateLimiter).options(**opts).remote(rpm, tpm, burst_s, budget_usd, owner_ttl_s)
    refs = []
    if rpm or tpm:
        refs.append(actor.register.remote(owner or default_owner(), rpm, tpm))
    if budget_usd is not None:
        refs.append(actor.configure.remote(rpm, tpm, budget_usd))
    if wait and refs:
        for res in ray.get(refs):
            if isinstance(res, dict) and res.get("conflict"):
                import logging

                logging.getLogger("subq.limiter").warning("limiter %s: %s", name, res["conflict"])
    return actor


async def reattach_limiter(name: str, owner: Optional[str], rpm: Optional[float] = None, tpm: Optional[float] = None,
                           max_retry_after_s: Optional[float] = None, *, namespace: str = "subq"):
    """The limiter `name` found or created again after its actor was lost for good, with `owner`'s limits registered
    on it (the owner whose OwnerLease renews them: the job's, or this replica's own), from inside an event loop."""
    actor = get_or_create_limiter(name, namespace=namespace, wait=False)
    if owner and (rpm or tpm):
        await actor.register.remote(owner, rpm, tpm, max_retry_after_s)
    return actor


class OwnerLease:
    """A job's limits on the shared limiter for as long as it runs: registered at once, renewed every `every_s`
    (a third of the limiter's owner TTL) on a daemon thread, registered again on a re-created limiter (found or
    created by name: a limiter restarted after its process died, or created again after its node was lost, comes
    back without owners), unregistered on `close()`. Without renewal a long job's stricter limit lapsed after the
    TTL and a job starting later set a looser one.

        with OwnerLease(name, owner, rpm=cfg.rpm, tpm=cfg.tpm) as lease:
            lease.conflict     # None, or a sentence naming what another owner asked for
    """

    def __init__(self, name: str, owner: str, rpm: Optional[float] = None, tpm: Optional[float] = None,
                 max_retry_after_s: Optional[float] = None, *, namespace: str = "subq",
                 every_s: Optional[float] = None, block: bool = True):
        """block=False (inside an event loop, e.g. a Serve replica's client): the first registration happens on
        the renewal thread, and a conflict is logged instead of returned."""
        import ray

        self.name, self.owner, self.namespace = name, owner, namespace
        self.limits = (rpm, tpm, max_retry_after_s)
        self.actor = get_or_create_limiter(name, namespace=namespace, wait=block)
        self.every_s = every_s
        self.renewals = 0
        self.conflict = None
        if block:
            if self.every_s is None:
                self.every_s = ray.get(self.actor.stats.remote())["owner_ttl_s"] / 3
            self.conflict = self._register()["conflict"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, args=(not block,), name=f"limiter-lease:{owner}",
                                        daemon=True)
        if rpm or tpm:  # nothing to renew without limits of our own (the limiter learns them from headers)
            self._thread.start()

    def _register(self) -> dict:
        import ray

        if not (self.limits[0] or self.limits[1]):
            return {"conflict": None}
        try:
            return ray.get(self.actor.register.remote(self.owner, *self.limits), timeout=30)
        except ray.exceptions.RayActorError:  # gone for good (its node was lost): the next one, by name
            self.actor = get_or_create_limiter(self.name, namespace=self.namespace)
            return ray.get(self.actor.register.remote(self.owner, *self.limits), timeout=30)

    def _renew(self, first: bool = False) -> None:
        if first:
            import logging

            import ray

            try:
                if self.every_s is None:
                    self.every_s = ray.get(self.actor.stats.remote(), timeout=30)["owner_ttl_s"] / 3
                self.conflict = self._register()["conflict"]
                if self.conflict:
                    logging.getLogger("subq.limiter").warning("limiter %s: %s", self.name, self.conflict)
            except Exception:  # noqa: BLE001 - the next period tries again
                self.every_s = self.every_s or 300.0
        while not self._stop.wait(self.every_s):
            try:
                self._register()
                self.renewals += 1
            except Exception:  # noqa: BLE001 - the next period tries again; Ray shut down ends the thread's use
                import ray

                if not ray.is_initialized():
                    return

    def close(self) -> None:
        """Stop renewing and unregister: this job's limits stop counting (the limiter stays for the others)."""
        import ray

        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            ray.get(self.actor.unregister.remote(self.owner), timeout=30)
        except Exception:  # noqa: BLE001 - a lost limiter forgot us already
            pass

    def __enter__(self) -> "OwnerLease":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
