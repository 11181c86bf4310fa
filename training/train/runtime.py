"""What the driver and every worker share: start-up stages under a time limit that name the stage that hung,\nand the network defaults of the process group (NCCL/gloo interfaces)."""

from __future__ import annotations

import os
from typing import Any



NETWORK_ENV_PREFIXES = ("NCCL_", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME")


def network_env() -> dict:
    """The driver's NCCL_* / GLOO_SOCKET_IFNAME settings, passed to every training worker (e.g.
    NCCL_SOCKET_IFNAME=eth0 on TCP-only clusters, where NCCL would otherwise pick a wrong interface)."""
    return {k: v for k, v in os.environ.items() if k.startswith(NETWORK_ENV_PREFIXES)}


NCCL_IFNAME_DEFAULT = "^docker0,lo"  # every interface but Docker's bridge and loopback: ens5 on the launcher's EC2


def network_defaults(env, use_gpu: bool) -> dict:
    """NCCL's socket interface where nothing set one: `^docker0,lo` (NCCL's exclusion form) instead of a fixed name.
    Applied to each GPU worker's environment before its first NCCL call (NCCL reads it when the first communicator
    is set up); the driver's NCCL_SOCKET_IFNAME (network_env, passed in the workers' runtime env) and the node's own
    (its `ray start` environment) win. Returns what was set."""
    if not use_gpu or env.get("NCCL_SOCKET_IFNAME"):
        return {}
    env["NCCL_SOCKET_IFNAME"] = NCCL_IFNAME_DEFAULT
    return {"NCCL_SOCKET_IFNAME": NCCL_IFNAME_DEFAULT}


def run_stage(name: str, seconds: float, fn, *args, hint="", **kwargs):
    """fn(*args, **kwargs) in a helper thread while this thread waits at most `seconds` (<= 0: no limit); past that,
    StageTimeout naming the stage (and the hint; a callable is asked then). Unlike training.ds_ops.stage_timeout
    (an asynchronous exception, delivered at the next Python bytecode) this also ends a wait inside a C call, e.g.
    NCCL setting up its communicator in the first collective of `deepspeed.initialize` with a wrong interface. The
    helper thread stays blocked; the failed worker's process is ended by Ray Train."""
    import threading

    from training.ds_ops import StageTimeout

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="subq-start-up-stage", daemon=True)
    t.start()
    t.join(seconds if seconds and seconds > 0 else None)
    if t.is_alive():
        msg = f"training start-up stuck in stage '{name}' for {seconds:.0f} s"
        hint = hint() if callable(hint) else hint
        raise StageTimeout(msg + (f"; {hint}" if hint else ""))
    if "error" in box:
        raise box["error"]
    return box.get("result")
