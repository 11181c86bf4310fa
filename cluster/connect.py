"""The one way subq starts or joins Ray: `ray_session(address=None, **kwargs)` for a job (generate, eval, train, the
demo: disconnects at its end what it connected), `init_ray(...)` for a server that outlives the call (serve).

    init_ray()                                   # RAY_ADDRESS, else the running `ray start` Ray, else a local one
    init_ray("10.0.0.5:6379")                    # a GCS address (what `ray start --head` prints; set in Ray jobs)
    init_ray("ray://10.0.0.5:10001")             # a Ray Client address
    init_ray(num_cpus=2, include_dashboard=False)  # options for a local Ray; dropped when joining a cluster

Two kinds of addresses, the way Ray uses them:

- **driver addresses** (`--ray-address`, `RAY_ADDRESS`): a GCS `HOST:PORT`, `ray://HOST:PORT`, `auto` or `local`;
  a driver (any local verb, any job) joins that cluster;
- **Jobs API addresses** (`--address`, `RAY_API_SERVER_ADDRESS`, or `RAY_ADDRESS` when it is `http(s)://`): the
  dashboard, for `subq submit` / `subq jobs` (cluster/jobs.py).

An `http(s)://` RAY_ADDRESS (as in `export RAY_ADDRESS=http://127.0.0.1:8265` before `subq submit`) never breaks
a local verb: if a Ray on this machine serves that dashboard, the verb joins that Ray (its GCS address is read
from the dashboard's own process); otherwise it starts a local Ray. Either way it says which on the terminal
(`subq.console.echo`). An `http(s)://` `--ray-address` that no local Ray serves is an `error:` (exit 2).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Iterator, Optional
from urllib.parse import urlparse

from subq.errors import SubqError

# ray.init options that only make sense when starting a Ray here; Ray refuses some of them when joining.
LOCAL_ONLY = ("num_cpus", "num_gpus", "resources", "labels", "object_store_memory", "include_dashboard",
              "dashboard_host", "dashboard_port", "_system_config", "_temp_dir")


@dataclass(frozen=True)
class Target:
    """Where `init_ray` goes. `address` is what ray.init gets; `joining`: an existing cluster (else a new local
    Ray); `note`: the line said on the terminal (empty: nothing worth saying); `explicit_local`: a Ray on this
    machine found behind a Jobs API address (token auth is enabled as for a Ray that ray.init finds itself)."""

    address: Optional[str]
    joining: bool
    note: str = ""
    explicit_local: bool = False


def is_http(address: Optional[str]) -> bool:
    return bool(address) and address.split("://", 1)[0].lower() in ("http", "https") and "://" in address


def _is_this_machine(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    try:
        import psutil

        return any(a.address == str(ip) for addrs in psutil.net_if_addrs().values() for a in addrs)
    except Exception:  # noqa: BLE001 - no psutil / no permission: not provably local
        return False


def local_gcs_for_dashboard(url: str) -> Optional[str]:
    """The GCS address of the Ray on THIS machine whose dashboard (Jobs API) listens at `url`, else None.
    Read from the dashboard process's own command line (`dashboard.py --port=P --gcs-address=G`)."""
    u = urlparse(url)
    if not u.hostname or not _is_this_machine(u.hostname):
        return None
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        import psutil
    except ImportError:
        return None
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if not any(a.endswith(os.path.join("dashboard", "dashboard.py")) for a in cmd):
            continue
        if f"--port={port}" not in cmd:
            continue
        gcs = next((a.split("=", 1)[1] for a in cmd if a.startswith("--gcs-address=")), None)
        if gcs:
            return gcs
    return None


def resolve(address: Optional[str] = None, environ: Optional[dict] = None) -> Target:
    """Decide where a driver goes (see the module docstring); no side effects."""
    env = os.environ if environ is None else environ
    explicit = address or None
    env_addr = (env.get("RAY_ADDRESS") or "").strip() or None
    addr = explicit or env_addr
    origin = "--ray-address" if explicit else "RAY_ADDRESS"
    src = f"--ray-address {addr}" if explicit else f"RAY_ADDRESS={addr}"
    if is_http(addr):
        gcs = local_gcs_for_dashboard(addr)
        if gcs:
            return Target(gcs, True, f"ray: {src} is the Jobs API of the Ray running on this machine; joined it "
                                     f"(GCS {gcs})", explicit_local=True)
        if explicit:
            raise SubqError(f"--ray-address {addr} is a Jobs API (dashboard) address and no Ray on this machine "
                            "serves it; a driver joins a cluster by its GCS address (HOST:6379) or "
                            "ray://HOST:10001", field="--ray-address",
                            hint=f"to run this verb on that cluster: subq submit VERB --address {addr} -- ARGS")
        return Target("local", False, f"ray: RAY_ADDRESS={addr} is a Jobs API address (for `subq submit` / "
                                      "`subq jobs`) that no Ray on this machine serves: started a local Ray "
                                      "(`subq submit` runs verbs on that cluster)")
    if addr == "local":
        return Target("local", False)
    if addr and addr != "auto":
        kind = "Ray Client" if addr.startswith("ray://") else "GCS"
        return Target(addr, True, f"ray: joined the cluster at {addr} ({kind} address, from {origin})")
    # None / "auto": Ray's own rule (the latest `ray start` on this machine, else a new local Ray for None)
    from ray._private import services

    services.find_gcs_addresses.cache_clear()
    try:
        found = services.get_ray_address_from_environment(addr, None)
    except ConnectionError:
        found = None
    if found:
        return Target(addr, True, f"ray: joined the Ray already running on this machine at {found} "
                                  "(set RAY_ADDRESS=local to start a separate one)")
    if addr == "auto":
        raise SubqError("RAY_ADDRESS=auto but no Ray is running on this machine", field="RAY_ADDRESS",
                        hint="start one with `ray start --head`, or unset RAY_ADDRESS")
    return Target(None, False)


def init_ray(address: Optional[str] = None, *, say: bool = True, **kwargs) -> Target:
    """Start or join Ray (no-op when this process is already connected). `address`: a driver address, or None for
    RAY_ADDRESS / the running Ray / a new local one; `kwargs` go to `ray.init` (options for a new local Ray are
    dropped when joining). A local start that misses Ray's fixed 30 s window for the raylet (a saturated machine)
    is tried again, twice. Says on the terminal which cluster it joined unless `say=False`. Returns the Target.
    Jobs use `ray_session` (which also disconnects at the end); a server that outlives the call uses this."""
    import ray

    if ray.is_initialized():
        return Target(None, True)
    for attempt in range(3):
        try:
            return _init_ray_once(address, say, kwargs)
        except Exception as e:  # noqa: BLE001 - only the start-up timeout is tried again
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, *, say: bool = True, **kwargs) -> Iterator[Target]:
    """The one Ray start of a job (generate, eval, train, the demo): `init_ray` for the with-block, and at its
    end `ray.shutdown()` only if this call connected the process: a job run inside a process already connected
    (a test, a notebook, the demo running the others) leaves that connection alone. Joining a cluster and
    disconnecting never stops the cluster; a local Ray started here stops with it."""
    import ray

    if ray.is_initialized():
        yield Target(None, True)
        return
    target = init_ray(address, say=say, **kwargs)
    try:
        yield target
    finally:
        ray.shutdown()


def _init_ray_once(address: Optional[str], say: bool, kwargs: dict) -> Target:
    import ray

    t = resolve(address)
    kw = dict(kwargs)
    if t.joining:
        for k in LOCAL_ONLY:
            kw.pop(k, None)
    if t.explicit_local:
        # Ray auto-enables token auth only for a local Ray it finds itself; this one was found by us
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except ImportError:
            pass
    ray.init(address=t.address, **kw)
    from subq import stop

    stop.reinstall()  # ray.init replaced SIGTERM's handler: ours again, so SIGTERM stops like Ctrl-C (subq.stop)
    if say and t.note:
        from subq import console

        console.echo(t.note)
    return t


AUTOSCALED_ENV = "SUBQ_AUTOSCALED_RESOURCES"  # set by ray_cluster.yaml's `ray start` commands


def schedulable(resources: Optional[dict]) -> Optional[dict]:
    """The custom resources a subq actor should request on the connected cluster: each of `resources` that some
    node has now, or that the cluster's autoscaler adds on demand (named, comma-separated, in
    $SUBQ_AUTOSCALED_RESOURCES, which ray_cluster.yaml's `ray start` sets on every node, so job drivers inherit
    it). Others are dropped, so a local Ray or a fixed cluster without such nodes still runs the work (a local Ray
    plays every node type). None when nothing is left."""
    import ray

    if not resources:
        return None
    have = ray.cluster_resources()
    scaled = {x.strip() for x in os.environ.get(AUTOSCALED_ENV, "").split(",") if x.strip()}
    keep = {k: v for k, v in resources.items() if k in have or k in scaled}
    return keep or None
