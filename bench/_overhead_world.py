"""The checkpoint-overhead benchmark's ranks: one (size, world) cell in spawned gloo processes.

Where it sits: between the methods (:mod:`bench._overhead_methods`) and
:func:`bench.bench_overhead.run`, which calls :func:`run_world` once per cell and reduces what
every rank returns. The flow: :func:`run_world` spawns ``world`` processes (:func:`_worker`: a
gloo group, one simulated node per rank); each runs :func:`_rank_main`: the model and the
calibrated batch of :mod:`bench._lazy_model` (DDP with 2 ranks), the baseline steps, then per
method, on a :class:`_Loop`: interval 1 measured directly, the isolated windows, the longer
intervals measured directly or composed from a window and the baseline (:func:`_derived`),
while :class:`_HostMemory` records the peak host memory the method adds (private RSS plus its
shared-memory files, :func:`dir_bytes`); then the baseline again.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

from ._common import free_port
from ._overhead_methods import _AsyncSave, _Blocking, _Method, _Recoverkit, memory_tiers
from .machine import median

__all__ = ["dir_bytes", "_HostMemory", "_Loop", "_derived", "_rank_main", "_worker", "run_world"]


# --------------------------------------------------------------------------- host memory
def _status_kib(keys: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":", 1)[0]
            if k in out:
                out[k] = int(line.split()[1])
    return out


def dir_bytes(path: str) -> int:
    """Bytes the files below ``path`` occupy (allocated blocks: what tmpfs holds in memory)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class _HostMemory:
    """Peak host memory a method adds: private memory (RssAnon, sampled every 10 ms) above its
    value at the start, plus the bytes of the shared-memory directory (``shm_bytes()``, read by
    the caller while the method still holds its snapshots). Shared pages a process maps are
    not counted twice: tmpfs files are counted once, by their blocks."""

    def __init__(self, shm_dir: str | None) -> None:
        import threading

        self.shm_dir = shm_dir
        self.base = _status_kib(("RssAnon",))["RssAnon"]
        self.peak = self.base
        self.shm_base = self._shm_now()  # what an earlier method left there is not this one's
        self.shm_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _status_kib(("RssAnon",))["RssAnon"])

    def _shm_now(self) -> int:
        return dir_bytes(self.shm_dir) if self.shm_dir and os.path.isdir(self.shm_dir) else 0

    def shm_bytes(self) -> int:
        self.shm_peak = max(self.shm_peak, self._shm_now() - self.shm_base)
        return self.shm_peak

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(timeout=5)
        anon = (self.peak - self.base) * 1024
        return {"anon_added_bytes": anon, "shm_bytes": self.shm_peak, "added_bytes": anon + self.shm_peak}


# --------------------------------------------------------------------------- the loop
class _Loop:
    def __init__(self, model: Any, opt: Any, x: Any, world: int) -> None:
        import torch.distributed as dist

        from ._lazy_model import _fwd_bwd, _opt_step

        self.model, self.opt, self.x, self.world = model, opt, x, world
        self._fb, self._os, self._dist = _fwd_bwd, _opt_step, dist
        self.step = 0

    def run(self, method: _Method | None, n: int, every: int) -> list[float]:
        """``n`` steps, a checkpoint after steps with ``(i % every) == 0``; each step's seconds."""
        out = []
        for i in range(n):
            self.step += 1
            t = time.perf_counter()
            self._fb(self.model, self.x)
            if method is not None:
                method.before_step()
            self._os(self.opt)
            if method is not None and every and i % every == 0:
                method.save(self.step)
            out.append(time.perf_counter() - t)
        return out

    def window(self, method: _Method, tail: int, max_steps: int) -> tuple[list[float], int]:
        """A checkpoint, then steps until the method is idle on every rank, then ``tail`` more."""
        import torch

        times = self.run(method, 1, 1)
        busy_steps = 0
        while len(times) < max_steps:
            flag = torch.tensor([1 if method.busy() else 0])
            if self.world > 1:
                self._dist.all_reduce(flag, op=self._dist.ReduceOp.MAX)
            if not flag.item():
                break
            busy_steps += 1
            times += self.run(method, 1, 0)
        times += self.run(method, tail, 0)
        return times, busy_steps


def _derived(window: list[float], k: int, base: float) -> float:
    head = window[:k]
    return (sum(head) + max(0, k - len(head)) * base) / k


# --------------------------------------------------------------------------- one world
def _rank_main(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from ._lazy_model import _calibrate, _model, _nbytes, _state_dict, _tensors

    t_start = time.perf_counter()
    size = cfg["size_mib"]
    model, opt, side = _model(size)
    tensors = _tensors(model, opt)
    nbytes = _nbytes(tensors)
    cal = _calibrate(model, opt, side, tensors, cfg["cal_reps"], max_batch=cfg["max_batch"])
    batch = torch.tensor([cal["batch"]])
    dist.broadcast(batch, 0)  # every rank trains on rank 0's batch size
    x = torch.randn(int(batch.item()), side, generator=torch.Generator().manual_seed(2 + rank))
    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model)
    ckpt_pg = dist.new_group(backend="gloo")  # DCP's collectives never interleave with DDP's
    loop = _Loop(ddp, opt, x, world)
    loop.run(None, 1, 0)  # warm-up
    base_times = loop.run(None, cfg["base_steps"], 0)
    work = cfg["workdir"]

    def state() -> dict[str, Any]:
        return _state_dict(model, opt)

    def make(name: str) -> _Method:
        if name == "recoverkit":
            return _Recoverkit(os.path.join(work, "rk"), {"model": ddp, "optimizer": opt}, nbytes)
        if name == "recoverkit_host":
            from recoverkit import TierSpec

            return _Recoverkit(os.path.join(work, "rk-host"), {"model": ddp, "optimizer": opt}, nbytes,
                               tiers=[TierSpec.host(keep=1), TierSpec.local(every_steps=0)], name=name)
        if name == "recoverkit_memory":
            return _Recoverkit(os.path.join(work, "rk-memory"), {"model": ddp, "optimizer": opt}, nbytes,
                               tiers=memory_tiers(world), name=name)
        if name == "torch_save":
            def ts(step: int) -> str:
                p = os.path.join(work, f"torch-{step:06d}.pt")
                torch.save(state(), p)
                return p

            return _Blocking(name, ts, rank0_only=True, rank=rank)
        if name == "dcp_save":
            def ds(step: int) -> str:
                p = os.path.join(work, f"dcp-{step:06d}")
                dcp.save(state(), checkpoint_id=p, process_group=ckpt_pg)
                return p

            return _Blocking(name, ds, rank0_only=False, rank=rank)
        if name == "dcp_async_save":
            return _AsyncSave(work, state, ckpt_pg)
        raise ValueError(name)

    out: dict[str, Any] = {}
    for name in cfg["methods"]:
        t_m = time.perf_counter()
        dist.barrier()
        gc.collect()
        mem = _HostMemory(cfg.get("shm_dir"))
        m = make(name)
        res: dict[str, Any] = {"iteration_s": {}, "mode": {}, "steps": {}}
        # interval 1, directly: warm-up checkpoint(s), then n1 counted ones, then one more step
        warm = cfg["warmup"]
        t1 = loop.run(m, warm + cfg["n1"], 1)[warm:]
        loop.run(m, 1, 0)  # the last checkpoint's pre-step wait lands here
        stalls1 = m.stalls()[warm : warm + cfg["n1"]]
        m.drain()
        mem.shm_bytes()
        res["iteration_s"]["1"] = sum(t1) / len(t1)
        res["mode"]["1"], res["steps"]["1"] = "measured", len(t1)
        res["k1_step_s"] = t1
        res["stall_every_step_s"] = stalls1
        # isolated windows
        windows, busy = [], []
        n_before = len(m.stalls())
        for _ in range(cfg["windows"]):
            w, b = loop.window(m, cfg["tail"], cfg["max_window"])
            windows.append(w)
            busy.append(b)
            m.drain()
        res["stall_isolated_s"] = m.stalls()[n_before:]
        res["window_s"] = windows
        res["window_busy_steps"] = busy
        for k in cfg["intervals"]:
            if k == 1:
                continue
            if cfg["direct"] or max(busy) + 1 >= k:
                ts_k = loop.run(m, k * cfg["direct_intervals"], k)
                loop.run(m, 1, 0)
                m.drain()
                res["iteration_s"][str(k)] = sum(ts_k) / len(ts_k)
                res["mode"][str(k)], res["steps"][str(k)] = "measured", len(ts_k)
            else:  # composed below, once the baseline after every method is known too
                res["mode"][str(k)] = "window + baseline"
                res["steps"][str(k)] = sum(len(w) for w in windows)
        mem.shm_bytes()
        m.close()
        res["host_memory"] = mem.stop()
        res["budget_bytes"] = getattr(m, "budget_bytes", None)
        res["info"] = getattr(m, "info", getattr(m, "options", {}))
        if isinstance(res["info"], dict):
            res["info"] = {k: str(v) for k, v in res["info"].items()}
        res["runtime_s"] = time.perf_counter() - t_m
        out[name] = res
        del m
        gc.collect()
    dist.barrier()
    base_after = loop.run(None, cfg["base_steps"], 0)  # the machine may have drifted meanwhile
    base = median(base_times + base_after)
    for res in out.values():
        for k, mode in res["mode"].items():
            if mode != "measured":
                res["iteration_s"][k] = median([_derived(w, int(k), base) for w in res["window_s"]])
        res["iteration_s"] = {str(k): res["iteration_s"][str(k)] for k in cfg["intervals"]}
    return {
        "rank": rank,
        "bytes": nbytes,
        "params": sum(p.numel() for p in model.parameters()),
        "width": side,
        "calibration": cal,
        "batch": int(batch.item()),
        "baseline_s": base_times + base_after,
        "baseline_before_s": base_times,
        "baseline_after_s": base_after,
        "baseline_median_s": base,
        "methods": out,
        "torch_threads": torch.get_num_threads(),
        "runtime_s": time.perf_counter() - t_start,
    }


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], queue: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    if cfg.get("shm_dir"):  # one simulated node per rank, their shared memory in the cell's directory
        os.environ.update(RECOVERKIT_SHM_DIR=cfg["shm_dir"], RECOVERKIT_NODE=f"node{rank}")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=900))
    try:
        queue.put((rank, "ok", _rank_main(rank, world, cfg)))
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can race interpreter shutdown


def run_world(world: int, cfg: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
    """Runs one (size, world) cell in ``world`` spawned processes; returns every rank's result."""
    import queue as queue_mod

    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world:
            try:
                rank, status, value = q.get(timeout=1.0)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"world of {world} did not finish within {timeout_s:.0f} s") from None
                continue
            (results if status == "ok" else errors)[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(f"rank {r} failed:\n{e}" for r, e in sorted(errors.items())))
    if len(results) < world:
        raise RuntimeError(f"ranks {sorted(set(range(world)) - set(results))} died without a result")
    return [results[r] for r in range(world)]
