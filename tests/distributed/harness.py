"""Run a function in a real torch.distributed world (gloo on CPU) of N processes.

Each worker ends with ``barrier(); destroy_process_group(); flush; os._exit(0)``: exiting
normally after gloo collectives races gloo's threads against interpreter shutdown and
aborts a fraction of runs (see the shared ENVIRONMENT notes).
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any, final_barrier: bool) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    if final_barrier:
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    queue.close()
    queue.join_thread()  # the result is fully in the pipe before the process ends
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_world(n: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 180, final_barrier: bool = True) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``n`` ranks; return each rank's result.

    Raises AssertionError with every failing rank's traceback. Ranks that die without
    reporting (SIGKILL) are reported as ``None`` when the others succeed.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, n, port, fn, args, queue, final_barrier)) for r in range(n)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout_s
    while len(results) + len(errors) < n:
        alive = any(p.is_alive() for p in procs)
        try:
            rank, status, value = queue.get(timeout=0.5)
        except queue_mod.Empty:
            if not alive:
                break
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise AssertionError(f"world of {n} did not finish within {timeout_s} s") from None
            continue
        (results if status == "ok" else errors)[rank] = value
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(f"rank {r} failed:\n{e}" for r, e in sorted(errors.items())))
    return [results.get(r) for r in range(n)]
