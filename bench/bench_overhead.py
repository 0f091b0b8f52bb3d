"""What checkpointing every k steps costs a training loop: recoverkit vs torch.save and DCP.

For three states (default ~256 MiB, ~1 GiB and ~2.25 GiB: an 8-layer MLP's float32 parameters
plus AdamW's two moments), in 1- and 2-rank gloo worlds (2 ranks: DDP, every rank holds the
whole state, recoverkit and DCP write replicated tensors once, ``torch.save`` runs on rank 0),
with a batch chosen so forward+backward takes about twice a plain memory copy of the state
(``bench_lazy``'s calibration), each method is compared against the same loop without
checkpoints (the baseline) and against the others:

* ``recoverkit``: ``Checkpointer.save_async`` (lazy copies into the staging pool overlapped with
  the next forward+backward, then host snapshot + local disk with fsync for every checkpoint);
  stall = the call + the optimizer's pre-step wait for its copies;
* ``recoverkit_host`` (opt-in, ``--methods``): ``save_async`` into the host tier only (staging
  pool, no shared memory, no disk): the in-memory reference ``recoverkit_memory`` is read against;
* ``recoverkit_memory`` (issue 12): ``save_async`` into the shared-memory tier and, with 2 ranks
  (one simulated node each: ``RECOVERKIT_NODE``), a peer replica of every checkpoint; no disk;
* ``torchft`` (2-rank cells, when installed: :mod:`bench._torchft`): two replica groups of one
  process train the same model with the same batch in a world of their own, plain DDP first
  (its baseline), then torchft's Manager (a quorum every step) + torchft DDP; its row is that
  world's step time and overhead;
* ``torch_save``: ``torch.save`` of the state dicts (page cache, no fsync); stall = the call;
* ``dcp_save``: ``torch.distributed.checkpoint.save``; stall = the call;
* ``dcp_async_save``: ``dcp.async_save`` with a reused ``DefaultStager`` (async staging into
  cached host storages, thread checkpointer; see ``bench_lazy._dcp_stager``) on a dedicated
  gloo group; stall = the call + the wait for staging before the next optimizer step + the wait
  for the previous upload before the next save.

Figures: per-checkpoint training stall, and the mean iteration time at checkpoint intervals
1, 10 and 100 steps next to the baseline. Interval 1 is always measured directly (a checkpoint
after every step). Longer intervals are measured directly with ``--direct``; by default they
are composed from measurements so the whole matrix fits ~25 minutes on 2 cores: one isolated
checkpoint "window" per method is measured (the checkpoint's step, then every step until the
method's background work has finished on every rank, then ``--tail`` more), and interval k's
mean iteration time is ``(sum of the window's first k steps + (k - window length) * baseline) / k``
with the baseline the median step without checkpoints, measured before and after all methods.
When the background work outlasts k steps the interval is measured directly instead. The
result records which was done for every cell, and every step count.

On a CPU-only machine the background copies and writes share the cores with training, so the
iteration time, not the stall alone, is the figure to compare. Each method's peak host memory
added (private RSS sampled every 10 ms + its files in the cell's shared-memory directory) is
reported next to its budget (staging pool + shared-memory stores).

Run: ``python -m bench.bench_overhead [--smoke] [--sizes 256,1024,2304] [--worlds 1,2]
[--intervals 1,10,100] [--methods recoverkit,recoverkit_memory,...,torchft] [--direct] [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ._common import free_port, keep_last
from .machine import median
from .report import publish

METHODS = ("recoverkit", "recoverkit_memory", "torch_save", "dcp_save", "dcp_async_save")
#: a separate world of its own (bench._torchft), run after the cell's when torchft is installed
TORCHFT = "torchft"
DEFAULT_SIZES = (256, 1024, 2304)
DEFAULT_INTERVALS = (1, 10, 100)
#: accepted by ``--methods``, not run by default
OPT_IN = ("recoverkit_host",)
COLORS = {"recoverkit": "tab:blue", "recoverkit_host": "tab:olive", "recoverkit_memory": "tab:cyan", "torch_save": "tab:orange",
          "dcp_save": "tab:green", "dcp_async_save": "tab:red", TORCHFT: "tab:purple"}


# --------------------------------------------------------------------------- methods
class _Method:
    """One checkpointing method driven by the same loop: before_step / save / busy / close."""

    name = ""

    def before_step(self) -> float:
        """Called after forward+backward, before the optimizer step; returns seconds waited."""
        return 0.0

    def save(self, step: int) -> float:
        """Starts or does a checkpoint after the optimizer step; returns seconds spent waiting."""
        raise NotImplementedError

    def busy(self) -> bool:
        """True while background work of an earlier checkpoint is still running."""
        return False

    def stalls(self) -> list[float]:
        """Training stall of every checkpoint so far (needs the step after each one)."""
        raise NotImplementedError

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


def memory_tiers(world: int) -> list[Any]:
    """``recoverkit_memory``'s tiers: shared memory every step, + a peer replica every step
    when there is another node (world 2: one rank per simulated node)."""
    from recoverkit import TierSpec

    tiers = [TierSpec.shm()]  # type: ignore[attr-defined]
    if world > 1:
        tiers.append(TierSpec.replica(k=1))  # type: ignore[attr-defined]
    return tiers


class _Recoverkit(_Method):
    """``recoverkit``: host snapshot + local disk every checkpoint; ``recoverkit_memory``: the
    memory tiers of :func:`memory_tiers` only (no disk)."""

    name = "recoverkit"

    def __init__(self, root: str, state: dict[str, Any], nbytes: int, tiers: list[Any] | None = None,
                 name: str = "recoverkit") -> None:
        from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy, TierSpec
        from recoverkit.config import StagingPolicy

        self.name = name
        pieces = nbytes // (64 << 20) + 128
        self.budget_bytes = 2 * (nbytes + pieces * 4096) + (16 << 20)
        opts = CheckpointOptions(
            retention=RetentionPolicy(keep_last=1),
            tiers=tiers or [TierSpec.host(keep=1), TierSpec.local(every_steps=1)],
            staging=StagingPolicy(budget_bytes=self.budget_bytes),
        )
        self.ckpt = Checkpointer(root, options=opts)
        # the memory the method may take: the staging pool + every shared-memory store's budget
        self.budget_bytes += sum(int(getattr(getattr(t, "store", None), "budget_bytes", 0) or 0)
                                 for t in self.ckpt.tiers.values())
        self.state = state
        self.handles: list[Any] = []

    def save(self, step: int) -> float:
        h = self.ckpt.save_async(step, self.state)
        self.handles.append(h)
        return h.metrics.get("call_s", 0.0)

    def busy(self) -> bool:
        return bool(self.handles) and not self.handles[-1].done()

    def stalls(self) -> list[float]:
        return [h.metrics.get("call_s", 0.0) + h.metrics.get("prestep_wait_s", 0.0) for h in self.handles]

    def drain(self) -> None:
        self.ckpt.wait()
        for h in self.handles:
            h.wait()

    def close(self) -> None:
        self.drain()
        staged = [h.metrics.get("staged_in") for h in self.handles]
        self.info = {"skipped_saves": self.ckpt.skipped_saves,
                     # saves staged straight into a shared-memory slot / into the staging pool
                     "staged_in_shm": staged.count("shm"), "staged_in_pool": staged.count("pool")}
        shm = self.ckpt.tiers.get("shm")
        if shm is not None:  # shm snapshots written in place / copied from the pool
            self.info.update(shm_in_place=getattr(shm, "in_place", 0), shm_copied=getattr(shm, "copied", 0))
        self.ckpt.close()


class _Blocking(_Method):
    def __init__(self, name: str, fn: Callable[[int], str], rank0_only: bool, rank: int) -> None:
        self.name, self.fn, self.rank0_only, self.rank = name, fn, rank0_only, rank
        self.times: list[float] = []
        self.kept: list[str] = []

    def save(self, step: int) -> float:
        t = time.perf_counter()
        if not self.rank0_only or self.rank == 0:
            self.kept.append(self.fn(step))
            keep_last(self.kept, 1)
        dt = time.perf_counter() - t
        self.times.append(dt)
        return dt

    def stalls(self) -> list[float]:
        return list(self.times)

    def close(self) -> None:
        keep_last(self.kept, 0)


class _AsyncSave(_Method):
    name = "dcp_async_save"

    def __init__(self, base: str, get_state: Callable[[], dict[str, Any]], pg: Any) -> None:
        from .bench_lazy import _dcp_stager

        self.base, self.get_state, self.pg = base, get_state, pg
        self.stager, self.options = _dcp_stager()
        self.resp: Any = None
        self.call: list[float] = []
        self.stage_wait: list[float] = []
        self.upload_wait: list[float] = []
        self.dirs: list[str] = []
        self._staged = True

    def before_step(self) -> float:
        if self._staged or self.resp is None:
            return 0.0
        fut = getattr(self.resp, "staging_completion", None)
        t = time.perf_counter()
        if fut is not None:
            fut.result()
        dt = time.perf_counter() - t
        self.stage_wait[-1] += dt
        self._staged = True
        return dt

    def _upload(self) -> Any:
        return getattr(self.resp, "upload_completion", self.resp)

    def save(self, step: int) -> float:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        waited = 0.0
        if self.resp is not None:
            t = time.perf_counter()
            self._upload().result()
            waited = time.perf_counter() - t
            self.upload_wait[-1] += waited
            keep_last(self.dirs, 1)
        d = os.path.join(self.base, f"dcp-async-{step:06d}")
        kwargs: dict[str, Any] = {"checkpoint_id": d, "process_group": self.pg, "async_checkpointer_type": AsyncCheckpointerType.THREAD}
        if self.stager is not None:
            kwargs["async_stager"] = self.stager
        t = time.perf_counter()
        self.resp = dcp.async_save(self.get_state(), **kwargs)
        dt = time.perf_counter() - t
        self.call.append(dt)
        self.stage_wait.append(0.0)
        self.upload_wait.append(0.0)
        self.dirs.append(d)
        self._staged = getattr(self.resp, "staging_completion", None) is None
        return waited + dt

    def busy(self) -> bool:
        if self.resp is None:
            return False
        fut = self._upload()
        return not fut.done()

    def stalls(self) -> list[float]:
        # save() charges the upload wait before save j+1 to save j
        return [c + s + u for c, s, u in zip(self.call, self.stage_wait, self.upload_wait)]

    def drain(self) -> None:
        if self.resp is not None:
            self.before_step()
            self._upload().result()

    def close(self) -> None:
        self.drain()
        if self.stager is not None:
            self.stager.close()
        keep_last(self.dirs, 0)


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

        from .bench_lazy import _fwd_bwd, _opt_step

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

    from .bench_lazy import _calibrate, _model, _nbytes, _state_dict, _tensors

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


# --------------------------------------------------------------------------- run
def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": median(xs), "mean": sum(xs) / len(xs), "max": max(xs), "n": len(xs)} if xs else {"median": 0.0, "mean": 0.0, "max": 0.0, "n": 0}


def run(
    sizes: list[int],
    worlds: list[int],
    intervals: list[int],
    *,
    methods: list[str] | None = None,
    n1: int = 3,
    warmup: int = 1,
    windows: int = 1,
    tail: int = 2,
    base_steps: int = 4,
    direct: bool = False,
    direct_intervals: int = 1,
    cal_reps: int = 3,
    max_batch: int = 1 << 16,
    workdir: str | None = None,
    smoke: bool = False,
    timeout_s: float = 1800,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    intervals = sorted(set(intervals) | {1})
    methods = list(methods or (*METHODS, TORCHFT))
    not_run: dict[str, str] = {}
    if "recoverkit_memory" in methods:
        from ._workers import memory_tiers_missing

        why = memory_tiers_missing("replica" if max(worlds) > 1 else "shm")
        if why:
            not_run["recoverkit_memory"] = why
    if TORCHFT in methods:
        from . import _torchft

        why = _torchft.available() or (None if 2 in worlds else "torchft runs in the 2-rank cells only")
        if why:
            not_run[TORCHFT] = why
    world_methods = [m for m in methods if m != TORCHFT and m not in not_run]
    cells: list[dict[str, Any]] = []
    for world in worlds:
        for size in sizes:
            base = tempfile.mkdtemp(prefix=f"rk-bench-overhead-{size}m-{world}r-", dir=workdir)
            shm_dir = tempfile.mkdtemp(prefix="rk-bench-overhead-", dir="/dev/shm" if os.path.isdir("/dev/shm") else base)
            cfg = {
                "size_mib": size, "methods": world_methods, "intervals": intervals, "n1": n1, "warmup": warmup,
                "windows": windows, "tail": tail, "max_window": min(max(intervals) + 1, 30), "base_steps": base_steps,
                "direct": direct, "direct_intervals": direct_intervals, "cal_reps": cal_reps,
                "max_batch": max_batch, "workdir": base, "shm_dir": shm_dir,
            }
            t_cell = time.perf_counter()
            try:
                ranks = run_world(world, cfg, timeout_s)
            finally:
                shutil.rmtree(base, ignore_errors=True)
                shm_left = dir_bytes(shm_dir)
                shutil.rmtree(shm_dir, ignore_errors=True)
            r0 = ranks[0]
            cell: dict[str, Any] = {
                "size_mib": size, "world": world, "bytes": r0["bytes"], "params": r0["params"],
                "width": r0["width"], "batch": r0["batch"], "calibration": r0["calibration"],
                "torch_threads_per_rank": r0["torch_threads"],
                "baseline_iteration_s": _stats(r0["baseline_s"]),
                "baseline_before_after_median_s": [median(r0["baseline_before_s"]), median(r0["baseline_after_s"])],
                "methods": {},
                "shm_bytes_left_after_close": shm_left,
                "runtime_s": time.perf_counter() - t_cell,
            }
            for name in world_methods:
                mr = r0["methods"][name]
                stall_all = [x for r in ranks for x in r["methods"][name]["stall_every_step_s"]]
                cell["methods"][name] = {
                    "iteration_s": mr["iteration_s"],
                    "overhead": {k: v / cell["baseline_iteration_s"]["median"] - 1 for k, v in mr["iteration_s"].items()},
                    "mode": mr["mode"],
                    "steps": mr["steps"],
                    "stall_every_step_s": _stats(mr["stall_every_step_s"]),
                    "stall_every_step_max_over_ranks_s": max(stall_all) if stall_all else 0.0,
                    "stall_isolated_s": _stats(mr["stall_isolated_s"]),
                    "window_s": mr["window_s"],
                    "window_busy_steps": mr["window_busy_steps"],
                    "k1_step_s": mr["k1_step_s"],
                    "info": mr["info"],
                    "host_memory": mr["host_memory"],
                    "host_memory_max_over_ranks": max(r["methods"][name]["host_memory"]["added_bytes"] for r in ranks),
                    "budget_bytes": mr["budget_bytes"],
                    "runtime_s": mr["runtime_s"],
                }
            if world == 2 and TORCHFT in methods and TORCHFT not in not_run:
                from . import _torchft

                try:
                    cell[TORCHFT] = _torchft.run_overhead(size, cell["batch"], steps=max(3, 2 * base_steps),
                                                          timeout_s=timeout_s)
                except Exception as e:  # noqa: BLE001 - the other rows stand
                    cell[TORCHFT] = {"error": str(e)[-2000:]}
                    print(f"[overhead] torchft failed: {e}", file=sys.stderr, flush=True)
            cells.append(cell)
            print(f"[overhead] {size} MiB x {world} rank(s): {cell['runtime_s']:.0f} s", file=sys.stderr, flush=True)
    return {
        "scenario": "overhead",
        "smoke": smoke,
        "sizes_mib": sizes,
        "worlds": worlds,
        "intervals": intervals,
        "methods": world_methods + ([TORCHFT] if TORCHFT in methods and TORCHFT not in not_run else []),
        "not_run": not_run,
        "step_counts": {
            "warmup_checkpoints": warmup, "interval_1_counted_checkpoints": n1, "windows_per_method": windows,
            "tail_steps": tail, "baseline_steps": base_steps, "direct": direct, "direct_intervals": direct_intervals,
            "calibration_reps": cal_reps,
        },
        "cells": cells,
        "runtime_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- output
def table(r: dict[str, Any]) -> str:
    ks = [str(k) for k in r["intervals"]]
    sc = r["step_counts"]
    lines = [
        f"mean iteration time (s) with a checkpoint every k steps vs the same loop without checkpoints; "
        f"stall = training time lost per checkpoint (median over {sc['interval_1_counted_checkpoints']} "
        f"back-to-back checkpoints at k=1, and over {sc['windows_per_method']} isolated one(s))"
        + (" [smoke]" if r["smoke"] else ""),
        f"step counts: {sc['warmup_checkpoints']} warm-up + {sc['interval_1_counted_checkpoints']} counted checkpoints at k=1; "
        f"{sc['baseline_steps']} baseline steps before and {sc['baseline_steps']} after the methods; longer intervals "
        + ("measured directly" if sc["direct"] else f"from {sc['windows_per_method']} isolated window(s) + the baseline median (`*`), "
           "measured directly where the background work outlasts k")
        + f"; {sc['tail_steps']} tail steps per window",
        "",
    ]
    for c in r["cells"]:
        b = c["baseline_iteration_s"]["median"]
        cal = c["calibration"]
        lines += [
            f"**{c['bytes'] / 2**30:.2f} GiB state, {c['world']} rank(s)** ({c['params'] / 1e6:.0f} M params, "
            f"batch {c['batch']}: fwd+bwd {cal['fwd_bwd_s'] * 1e3:.0f} ms = {cal['fwd_bwd_vs_memcpy']:.1f}x memcpy "
            f"{cal['memcpy_s'] * 1e3:.0f} ms; {c['torch_threads_per_rank']} thread(s) per rank; cell {c['runtime_s']:.0f} s)",
            "",
            "| method | " + " | ".join(f"k={k}: iter s (overhead)" for k in ks) + " | stall s, k=1 | stall s, isolated |",
            "|---|" + "---:|" * (len(ks) + 2),
            "| no checkpoint | " + " | ".join(f"{b:.3f}" for _ in ks) + " | - | - |",
        ]
        for name, m in c["methods"].items():
            row = [
                f"{m['iteration_s'][k]:.3f}{'*' if m['mode'][k] != 'measured' else ''} ({m['overhead'][k] * 100:+.1f}%)"
                for k in ks
            ]
            lines.append(
                f"| {name} | " + " | ".join(row)
                + f" | {m['stall_every_step_s']['median']:.3f} | {m['stall_isolated_s']['median']:.3f} |"
            )
        ft = c.get(TORCHFT)
        if ft and "error" not in ft:
            lines.append(f"| torchft, every step (own world; its plain DDP {ft['baseline_step_s']:.3f}) | "
                         f"{ft['torchft_step_s']:.3f} ({ft['overhead'] * 100:+.1f}%) | " + " | ".join("-" for _ in ks[1:])
                         + (" | " if len(ks) > 1 else "") + "- | - |")
        rk = c["methods"].get("recoverkit")
        if rk:
            others = [n for n in c["methods"] if n != "recoverkit"]
            ratios = ", ".join(
                f"{n} {rk['stall_every_step_s']['median'] / max(1e-9, c['methods'][n]['stall_every_step_s']['median']):.3f}"
                for n in others
            )
            lines += ["", f"- recoverkit stall / other method's stall (k=1): {ratios}"]
        mem = c["methods"].get("recoverkit_memory")
        if mem:
            ov = mem["overhead"]["1"]
            what = "shared memory + a peer replica" if c["world"] > 1 else "shared memory"
            lines.append(f"- recoverkit_memory ({what} every step, no disk): {ov * 100:+.1f}% per step vs no "
                         f"checkpoint (target <= 3 %: {'met' if ov <= 0.03 else 'MISSED'})")
        ft = c.get(TORCHFT)
        if ft and "error" not in ft:
            line = (f"- torchft (2 replica groups of 1 process: Manager quorum every step, torchft DDP, same model "
                    f"and batch, its own world): {ft['torchft_step_s']:.3f} s per step vs {ft['baseline_step_s']:.3f} s "
                    f"plain DDP on the same processes: {ft['overhead'] * 100:+.1f}%")
            if mem:
                line += f"; recoverkit_memory {mem['overhead']['1'] * 100:+.1f}%"
            lines.append(line)
        elif ft:
            lines.append(f"- torchft: failed: {ft['error'].splitlines()[-1][:200]}")
        mems = [(n, m) for n, m in c["methods"].items() if m.get("host_memory")]
        if mems:
            lines.append("- peak host memory added per rank (private RSS above the start + shared-memory files; "
                         "budget: staging pool + shared-memory stores): " + ", ".join(
                             f"{n} {m['host_memory']['added_bytes'] / 2**20:.0f} MiB"
                             + (f" ({m['host_memory']['shm_bytes'] / 2**20:.0f} MiB in /dev/shm)"
                                if m["host_memory"]["shm_bytes"] else "")
                             + (f" of budget {m['budget_bytes'] / 2**20:.0f} MiB" if m.get("budget_bytes") else "")
                             for n, m in mems))
        if c.get("shm_bytes_left_after_close"):
            lines.append(f"- {c['shm_bytes_left_after_close']} bytes left in shared memory after every Checkpointer closed")
        lines.append("")
    for name, why in r.get("not_run", {}).items():
        lines.append(f"- {name}: not run: {why}")
    lines.append(f"- runtime {r['runtime_s']:.0f} s")
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        sizes = r["sizes_mib"]
        fig.set_size_inches(max(8.0, 4.2 * len(sizes)), 4.5)
        axes = fig.subplots(1, len(sizes), squeeze=False)[0]
        styles = {1: "-", 2: "--"}
        for ax, size in zip(axes, sizes):
            for c in r["cells"]:
                if c["size_mib"] != size:
                    continue
                ks = r["intervals"]
                ls = styles.get(c["world"], ":")
                for name, m in c["methods"].items():
                    ax.plot(ks, [m["iteration_s"][str(k)] for k in ks], ls, marker="o", ms=3, color=COLORS.get(name),
                            label=f"{name}, {c['world']}r")
                ax.axhline(c["baseline_iteration_s"]["median"], ls=ls, color="black", lw=0.8, label=f"no checkpoint, {c['world']}r")
                ax.set_title(f"{c['bytes'] / 2**30:.2f} GiB state", fontsize=9)
            ax.set_xscale("log")
            ax.set_xlabel("checkpoint interval (steps)")
            ax.tick_params(labelsize=7)
        axes[0].set_ylabel("mean iteration time (s)")
        handles, labels = axes[0].get_legend_handles_labels()
        axes[-1].legend(handles, labels, fontsize=6, loc="upper right")

    return draw


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="8 MiB, worlds 1 and 2, one checkpoint per phase (< 30 s)")
    ap.add_argument("--sizes", type=_ints, default=list(DEFAULT_SIZES), help="state sizes in MiB (params + AdamW)")
    ap.add_argument("--worlds", type=_ints, default=[1, 2])
    ap.add_argument("--intervals", type=_ints, default=list(DEFAULT_INTERVALS))
    ap.add_argument("--methods", type=lambda s: s.split(","), default=[*METHODS, TORCHFT],
                    help=f"comma-separated, of {','.join((*METHODS, TORCHFT, *OPT_IN))} (torchft: 2-rank cells, "
                         "when installed)")
    ap.add_argument("--n1", type=int, default=3, help="counted back-to-back checkpoints at interval 1")
    ap.add_argument("--windows", type=int, default=1, help="isolated checkpoint windows per method")
    ap.add_argument("--tail", type=int, default=2, help="steps after the background work ends, per window")
    ap.add_argument("--base-steps", type=int, default=4)
    ap.add_argument("--direct", action="store_true", help="measure every interval directly (k steps per interval)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None, help="default bench/results; smoke runs write nowhere unless given")
    a = ap.parse_args(argv)
    if a.smoke:
        r = run([8], a.worlds, a.intervals, methods=a.methods, n1=1, windows=1, tail=1, base_steps=2,
                direct=a.direct, cal_reps=1, max_batch=64, workdir=a.workdir, smoke=True, timeout_s=120)
    else:
        r = run(a.sizes, a.worlds, a.intervals, methods=a.methods, n1=a.n1, windows=a.windows, tail=a.tail,
                base_steps=a.base_steps, direct=a.direct, workdir=a.workdir)
    bad = [x for x in _numbers(r) if not math.isfinite(x)]
    if bad:
        print(f"[overhead] warning: {len(bad)} non-finite figure(s)", file=sys.stderr)
    text = table(r)
    print(text)
    if a.out_dir or not a.smoke:
        publish("overhead", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


def _numbers(tree: Any) -> Any:
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _numbers(v)
    elif isinstance(tree, float):
        yield tree


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
