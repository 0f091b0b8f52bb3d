"""Lazy asynchronous multi-level checkpointing: what a checkpoint every step costs a training loop.

On one model and one state (default 1 GiB: an 8-layer MLP's float32 parameters plus AdamW's two
moments), with a batch chosen so that forward+backward takes about twice a plain memory copy of
the state, in one run:

1. **Training stall per checkpoint**: recoverkit ``save_async`` (host snapshot + local disk every
   step; stall = ``call_s`` + ``prestep_wait_s``) vs ``torch.save`` (whole call),
   ``torch.distributed.checkpoint.save`` (whole call) and ``dcp.async_save`` with a reused
   ``DefaultStager`` (async staging into cached host storages; stall = call + wait for staging
   before the next optimizer step + wait for the previous upload before the next save).
2. **Iteration time** with ``save_async`` every step (host snapshot every step, local disk every
   10) vs no checkpointing.
3. **Restore time** per tier: host snapshot, local disk (page cache dropped where permitted), a
   resharded restore (1 rank -> rank 1 of 2, in-process), next to ``torch.load`` and ``dcp.load``.
4. **Memory**: peak RSS each method adds, and the staging pool's high-water mark vs its budget.

Run: ``python -m bench.bench_lazy [--smoke] [--size-mib 1024] [--steps 5] [--iters 20] [--out-dir DIR]``
(publishes ``lazy.json``, ``lazy.md`` and ``lazy.png`` to ``bench/results`` by default; smoke runs
write nowhere unless ``--out-dir`` is given).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy
from recoverkit.config import StagingPolicy, TierPolicy
from recoverkit.state.sharded import ShardedTensor

from ._common import free_port, fsync_file, keep_last
from .bench_limits import drop_caches, timed
from .machine import describe, median
from .report import publish

TARGETS = {
    "stall_vs_torch_save": 0.02,
    "stall_vs_async_save": 0.10,
    "iteration_overhead": 0.05,
    "pool_high_water_vs_budget": 1.0,
}
FWD_BWD_PER_MEMCPY = 2.0  # forward+backward is calibrated to this multiple of a state memcpy
LAYERS = 8


# --------------------------------------------------------------------------- the model
def _model(total_mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """An MLP of LAYERS square layers whose params + 2 AdamW moments are ~total_mib."""
    per_layer_bytes = total_mib * 2**20 / 3 / LAYERS
    side = max(16, int((per_layer_bytes / 4) ** 0.5) // 16 * 16)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i in range(LAYERS):
        layers.append(torch.nn.Linear(side, side, bias=False))
        if i < LAYERS - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():  # materialise AdamW's state
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)  # gradients stay allocated: steady memory and timings
    return model, opt, side


def _tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach() for p in model.parameters()]
    for s in opt.state.values():
        out += [v for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return out


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _fwd_bwd(model: torch.nn.Module, x: torch.Tensor) -> None:
    model(x).square().mean().backward()


def _opt_step(opt: torch.optim.Optimizer) -> None:
    opt.step()
    opt.zero_grad(set_to_none=False)


def _calibrate(
    model: torch.nn.Module, opt: torch.optim.Optimizer, side: int, tensors: list[torch.Tensor], reps: int, max_batch: int
) -> dict[str, Any]:
    """memcpy of the state into preallocated buffers, then a batch with fwd+bwd ~ 2x that."""
    bufs = [torch.empty_like(t) for t in tensors]

    def memcpy() -> None:
        for b, t in zip(bufs, tensors):
            b.copy_(t)

    memcpy_s = median(timed(memcpy, reps))
    bufs.clear()  # free the copies (the closure keeps the list itself)
    target = FWD_BWD_PER_MEMCPY * memcpy_s
    gen = torch.Generator().manual_seed(1)
    batch, fb = 16, 0.0
    tried: list[tuple[int, float]] = []
    for _ in range(4):  # fwd+bwd time is close to linear in the batch; a few refinements
        x = torch.randn(batch, side, generator=gen)
        fb = median(timed(lambda: _fwd_bwd(model, x), reps))  # noqa: B023
        tried.append((batch, fb))
        if abs(fb / target - 1) <= 0.1:
            break
        batch = max(1, min(max_batch, round(batch * target / fb)))
        if batch == tried[-1][0]:
            break
    # keep the closest batch tried
    batch, fb = min(tried, key=lambda bt: abs(bt[1] / target - 1))
    model.zero_grad(set_to_none=False)
    step_s = median(timed(lambda: opt.step(), max(1, reps // 2)))
    opt.zero_grad(set_to_none=False)
    nbytes = _nbytes(tensors)
    return {
        "memcpy_s": memcpy_s,
        "memcpy_gb_per_s": nbytes / memcpy_s / 1e9,
        "target_fwd_bwd_s": target,
        "batch": batch,
        "fwd_bwd_s": fb,
        "fwd_bwd_vs_memcpy": fb / memcpy_s,
        "optimizer_step_s": step_s,
        "tried": tried,
        "max_batch": max_batch,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- memory
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class _PeakRSS:
    """RSS the block adds at its peak: VmHWM after a reset, else a sampling thread."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.base = self.peak = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _PeakRSS:
        self.base = self.peak = _rss()
        if _reset_hwm():
            self.method = "VmHWM (clear_refs reset)"
        else:
            self.method = "RSS sampled every 5 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = max(self.peak, _hwm())
        self.peak = max(self.peak, _rss())

    @property
    def added(self) -> int:
        return max(0, self.peak - self.base)


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """A 1-process gloo group for DCP (unless one is already up)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _dcp_stager() -> tuple[Any, dict[str, Any]]:
    """async_save's best staging on this torch: a reused DefaultStager, async staging, cached storages."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:  # older torch: async_save's own blocking stager
        return None, {"stager": "default (DefaultStager unavailable)"}
    cuda = torch.cuda.is_available()
    opts = StagingOptions(
        use_pinned_memory=cuda,
        use_shared_memory=False,  # only for AsyncCheckpointerType.PROCESS
        use_async_staging=True,  # stage in a background thread, overlapping fwd+bwd
        use_non_blocking_copy=cuda,  # needs an accelerator
    )
    return DefaultStager(opts), {"stager": "DefaultStager (reused: cached staging storages)", **vars(opts)}


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": median(xs), "mean": sum(xs) / len(xs), "max": max(xs), "min": min(xs), "n": len(xs)}


def _state_dict(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


# --------------------------------------------------------------------------- 1. stall
def _stall_recoverkit(model, opt, x, root, warmup, steps, budget):  # type: ignore[no-untyped-def]
    """save_async after every optimizer step; host snapshot + local disk every step."""
    opts = CheckpointOptions(
        retention=RetentionPolicy(keep_last=1),
        tiers=TierPolicy(host_keep=1, local_every=1),
        staging=StagingPolicy(budget_bytes=budget),
    )
    state = {"model": model, "optimizer": opt}
    handles = []
    n = warmup + steps + 1  # the last save only gives the one before it a successor
    with _PeakRSS() as mem, Checkpointer(root, options=opts) as ckpt:
        for j in range(n):
            _fwd_bwd(model, x)
            _opt_step(opt)  # the pre-step hook waits for the previous save's lazy copies
            handles.append(ckpt.save_async(j + 1, state))
        _fwd_bwd(model, x)
        _opt_step(opt)
        ckpt.wait()
        for h in handles:
            h.wait()
        pool = ckpt._pipeline.pool
        pool_info = {"budget_bytes": budget, "capacity": int(pool.capacity), "high_water": int(pool.high_water)}
        skipped = ckpt.skipped_saves
    counted = handles[warmup : warmup + steps]
    stall = [h.metrics["call_s"] + h.metrics["prestep_wait_s"] for h in counted]
    return {
        "stall_s": stall,
        "call_s": [h.metrics["call_s"] for h in counted],
        "prestep_wait_s": [h.metrics["prestep_wait_s"] for h in counted],
        "staging_s": [h.metrics.get("staging_s", 0.0) for h in counted],
        "durable_local_s": [h.metrics.get("durable_s/local", 0.0) for h in counted],
        "bytes": int(counted[0].metrics.get("bytes", 0)),
        "skipped_saves": skipped,
        "pool": pool_info,
        "added_rss_bytes": mem.added,
        "rss_method": mem.method,
    }


def _stall_blocking(model, opt, x, save: Callable[[int], str], warmup: int, steps: int) -> dict[str, Any]:
    """A blocking save after every optimizer step: the stall is the whole call."""
    times, kept = [], []
    with _PeakRSS() as mem:
        for j in range(warmup + steps):
            _fwd_bwd(model, x)
            _opt_step(opt)
            t = time.perf_counter()
            kept.append(save(j + 1))
            dt = time.perf_counter() - t
            if j >= warmup:
                times.append(dt)
            keep_last(kept, 1)
    return {"stall_s": times, "added_rss_bytes": mem.added, "rss_method": mem.method, "last": kept[-1]}


def _stall_async_save(model, opt, x, base, warmup, steps):  # type: ignore[no-untyped-def]
    """dcp.async_save after every optimizer step.

    Stall of save j = its call + the wait for its staging before the next optimizer step + the
    wait for its upload before save j+1 (a reused stager's cached storages must not be
    overwritten while the previous upload still reads them).
    """
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    stager, info = _dcp_stager()
    n = warmup + steps + 1
    call, stage_wait, upload_wait = [0.0] * n, [0.0] * n, [0.0] * n
    dirs: list[str] = []
    resp = None

    def staging(r: Any) -> Any:
        return getattr(r, "staging_completion", None)

    def upload(r: Any) -> Any:
        return getattr(r, "upload_completion", r)

    with _PeakRSS() as mem:
        for j in range(n + 1):
            _fwd_bwd(model, x)
            if resp is not None and staging(resp) is not None:
                t = time.perf_counter()
                staging(resp).result()
                stage_wait[j - 1] = time.perf_counter() - t
            _opt_step(opt)
            if j == n:
                break
            if resp is not None:
                t = time.perf_counter()
                upload(resp).result()
                upload_wait[j - 1] = time.perf_counter() - t
                keep_last(dirs, 1)
            d = os.path.join(base, f"dcp-async-{j + 1:06d}")
            t = time.perf_counter()
            kwargs: dict[str, Any] = {"checkpoint_id": d, "async_checkpointer_type": AsyncCheckpointerType.THREAD}
            if stager is not None:
                kwargs["async_stager"] = stager
            resp = dcp.async_save(_state_dict(model, opt), **kwargs)
            call[j] = time.perf_counter() - t
            dirs.append(d)
        upload(resp).result()
        if stager is not None:
            stager.close()
    sl = slice(warmup, warmup + steps)
    stall = [c + s + u for c, s, u in zip(call[sl], stage_wait[sl], upload_wait[sl])]
    keep_last(dirs, 0)
    return {
        "stall_s": stall,
        "call_s": call[sl],
        "staging_wait_s": stage_wait[sl],
        "upload_wait_s": upload_wait[sl],
        "options": {k: str(v) for k, v in info.items()} | {"async_checkpointer_type": "thread"},
        "added_rss_bytes": mem.added,
        "rss_method": mem.method,
    }


# --------------------------------------------------------------------------- 2. iterations
def _iterations(model, opt, x, root, warmup, iters, budget, restore_reps, local_every):  # type: ignore[no-untyped-def]
    """Iteration time without checkpoints and with save_async every step; then host restore."""
    base = []
    for j in range(warmup + iters):
        t = time.perf_counter()
        _fwd_bwd(model, x)
        _opt_step(opt)
        if j >= warmup:
            base.append(time.perf_counter() - t)
    opts = CheckpointOptions(
        retention=RetentionPolicy(keep_last=1),
        tiers=TierPolicy(host_keep=1, local_every=local_every),
        staging=StagingPolicy(budget_bytes=budget),
    )
    state = {"model": model, "optimizer": opt}
    with_ckpt, handles = [], []
    host: list[float] = []
    restored: list[int] = []
    n = warmup + iters
    last = n if n % local_every else n + 1  # the last step must be on the host tier only
    with Checkpointer(root, options=opts) as ckpt:
        for j in range(1, last + 1):
            t = time.perf_counter()
            _fwd_bwd(model, x)
            _opt_step(opt)
            handles.append(ckpt.save_async(j, state))
            if warmup < j <= warmup + iters:
                with_ckpt.append(time.perf_counter() - t)
        ckpt.wait()
        for h in handles:
            h.wait()
        # 3a. restore from the host snapshot: step `last` is in memory only (not on local disk)
        for _ in range(restore_reps):
            t = time.perf_counter()
            got = ckpt.restore(state)
            host.append(time.perf_counter() - t)
            restored.append(got)  # != last: the host snapshot was not used (reported, not fatal)
        disk_steps = ckpt.tier.steps()  # the local disk only (steps() includes host memory)
        stall = [h.metrics["call_s"] + h.metrics["prestep_wait_s"] for h in handles[warmup : warmup + iters]]
    return {
        "no_checkpoint_s": base,
        "save_async_every_step_s": with_ckpt,
        "stall_s": stall,
        "host_restore_s": host,
        "host_restore_step": last,
        "host_restored_steps": restored,
        "local_steps": disk_steps,
    }


# --------------------------------------------------------------------------- 3. restores
def _restore_local(model, opt, root, reps):  # type: ignore[no-untyped-def]
    times, cold = [], True
    with Checkpointer(root) as ckpt:  # no pipeline: only the local (and persistent) tiers
        want = ckpt.steps()[-1]
        for _ in range(reps):
            cold = drop_caches() and cold
            t = time.perf_counter()
            got = ckpt.restore({"model": model, "optimizer": opt})
            times.append(time.perf_counter() - t)
            assert got == want, (got, want)
    return {"s": times, "cold": cold}


def _restore_resharded(tensors: list[torch.Tensor], root: str) -> dict[str, Any]:
    """Save every state tensor as a 1-rank ShardedTensor; restore rank 1 of 2's half of the rows."""
    full = {"shards": {f"t{i}": ShardedTensor(t, tuple(t.shape), (0,) * t.dim()) for i, t in enumerate(tensors)}}
    opts = CheckpointOptions(capture_rng=False, retention=RetentionPolicy(keep_last=1))
    with Checkpointer(root, options=opts) as ckpt:
        ckpt.save(1, full)
    targets: dict[str, Any] = {"shards": {}}
    halves = []
    for i, t in enumerate(tensors):
        lo = t.shape[0] // 2
        targets["shards"][f"t{i}"] = ShardedTensor(torch.zeros(t.shape[0] - lo, *t.shape[1:], dtype=t.dtype), tuple(t.shape), (lo,) + (0,) * (t.dim() - 1))
        halves.append((t, lo))
    cold = drop_caches()
    with Checkpointer(root, options=opts) as ckpt:
        t0 = time.perf_counter()
        ckpt.restore(targets)
        dt = time.perf_counter() - t0
    ok = all(torch.equal(targets["shards"][f"t{i}"].local, t[lo:]) for i, (t, lo) in enumerate(halves))
    nbytes = sum(v.local.numel() * v.local.element_size() for v in targets["shards"].values())
    return {"s": dt, "cold": cold, "bytes": nbytes, "bit_exact": ok, "layout": "saved by 1 rank -> rank 1 of 2 (rows split in half)"}


def _restore_torch_load(model, opt, path):  # type: ignore[no-untyped-def]
    cold = drop_caches()
    t = time.perf_counter()
    sd = torch.load(path, weights_only=True)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optimizer"])
    dt = time.perf_counter() - t
    return {"s": dt, "cold": cold}


def _restore_dcp_load(model, opt, path):  # type: ignore[no-untyped-def]
    cold = drop_caches()
    t = time.perf_counter()
    sd = _state_dict(model, opt)
    dcp.load(sd, checkpoint_id=path)  # loads in place into the live tensors
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optimizer"])
    dt = time.perf_counter() - t
    return {"s": dt, "cold": cold}


# --------------------------------------------------------------------------- run
def run(
    size_mib: int = 1024,
    steps: int = 5,
    warmup: int = 1,
    iters: int = 20,
    workdir: str | None = None,
    smoke: bool = False,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    reps = 2 if smoke else 5
    model, opt, side = _model(size_mib)
    tensors = _tensors(model, opt)
    nbytes = _nbytes(tensors)
    cal = _calibrate(model, opt, side, tensors, reps, max_batch=128 if smoke else 1 << 16)
    x = torch.randn(cal["batch"], side, generator=torch.Generator().manual_seed(2))
    # two snapshots of 4 KiB-aligned pieces (piece_bytes = 64 MiB), plus room for the blob
    pieces = sum(-(-t.numel() * t.element_size() // (64 << 20)) for t in tensors) + 64
    budget = 2 * (nbytes + pieces * 4096) + (16 << 20)
    base = tempfile.mkdtemp(prefix="rk-bench-lazy-", dir=workdir)
    r: dict[str, Any] = {
        "scenario": "lazy_async",
        "machine": describe(workdir or tempfile.gettempdir()),
        "bytes": nbytes,
        "model": {"layers": LAYERS, "width": side, "params": sum(p.numel() for p in model.parameters())},
        "calibration": cal,
        "steps": steps,
        "warmup": warmup,
        "iters": iters,
        "smoke": smoke,
        "local_every": 2 if smoke else 10,
    }
    try:
        with _process_group():
            # 1. stall per checkpoint, every method on the same loop
            rk = _stall_recoverkit(model, opt, x, os.path.join(base, "rk"), warmup, steps, budget)

            def torch_save(step: int) -> str:
                p = os.path.join(base, f"torch-{step:06d}.pt")
                torch.save(_state_dict(model, opt), p)
                return p

            ts = _stall_blocking(model, opt, x, torch_save, warmup, steps)
            fsync_file(ts["last"])  # its dirty pages must not slow the next phases down

            def dcp_save(step: int) -> str:
                p = os.path.join(base, f"dcp-{step:06d}")
                dcp.save(_state_dict(model, opt), checkpoint_id=p)
                return p

            ds = _stall_blocking(model, opt, x, dcp_save, warmup, steps)
            da = _stall_async_save(model, opt, x, base, warmup, steps)

            # 2. iteration time, and 3a. the host-snapshot restore at its end
            local_every = 2 if smoke else 10
            it = _iterations(
                model, opt, x, os.path.join(base, "rk-iter"), 1 if smoke else 3, iters, budget, 1 if smoke else 3, local_every
            )

            # 3. restores from disk
            local = _restore_local(model, opt, os.path.join(base, "rk-iter"), 1 if smoke else 2)
            tl = _restore_torch_load(model, opt, ts["last"])
            dl = _restore_dcp_load(model, opt, ds["last"])
            resh = _restore_resharded(tensors, os.path.join(base, "rk-reshard"))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    stall = {
        "recoverkit_save_async": _stats(rk["stall_s"]),
        "torch_save": _stats(ts["stall_s"]),
        "dcp_save": _stats(ds["stall_s"]),
        "dcp_async_save": _stats(da["stall_s"]),
    }
    rk_stall = stall["recoverkit_save_async"]["median"]
    it_base = median(it["no_checkpoint_s"])
    it_rk = median(it["save_async_every_step_s"])
    restore = {
        "host_snapshot": median(it["host_restore_s"]),
        "local_disk": median(local["s"]),
        "resharded_local_disk": resh["s"],
        "torch_load": tl["s"],
        "dcp_load": dl["s"],
    }
    pool = rk["pool"]
    r.update(
        {
            "stall_s": stall,
            "stall_detail": {
                "recoverkit_save_async": {k: rk[k] for k in ("stall_s", "call_s", "prestep_wait_s", "staging_s", "durable_local_s")},
                "torch_save": ts["stall_s"],
                "dcp_save": ds["stall_s"],
                "dcp_async_save": {k: da[k] for k in ("stall_s", "call_s", "staging_wait_s", "upload_wait_s")},
            },
            "dcp_async_options": da["options"],
            "recoverkit_skipped_saves": rk["skipped_saves"],
            "iteration_s": {
                "no_checkpoint": _stats(it["no_checkpoint_s"]),
                "save_async_every_step": _stats(it["save_async_every_step_s"]),
                "save_async_stall": _stats(it["stall_s"]),
                "all": {k: it[k] for k in ("no_checkpoint_s", "save_async_every_step_s")},
            },
            "restore_s": restore,
            "restore_detail": {
                "host_snapshot_all": it["host_restore_s"],
                "host_snapshot_step": it["host_restore_step"],
                "host_restored_steps": it["host_restored_steps"],
                "host_snapshot_used": all(g == it["host_restore_step"] for g in it["host_restored_steps"]),
                "local_disk_all": local["s"],
                "page_cache_dropped": bool(local["cold"] and tl["cold"] and dl["cold"] and resh["cold"]),
                "resharded": {k: v for k, v in resh.items() if k != "s"},
            },
            "memory": {
                "added_rss_bytes": {
                    "recoverkit_save_async": rk["added_rss_bytes"],
                    "torch_save": ts["added_rss_bytes"],
                    "dcp_save": ds["added_rss_bytes"],
                    "dcp_async_save": da["added_rss_bytes"],
                },
                "rss_method": rk["rss_method"],
                "pool": pool,
            },
            "ratios": {
                "stall_vs_torch_save": rk_stall / stall["torch_save"]["median"],
                "stall_vs_dcp_save": rk_stall / stall["dcp_save"]["median"],
                "stall_vs_async_save": rk_stall / stall["dcp_async_save"]["median"],
                "iteration_overhead": it_rk / it_base - 1,
                "host_restore_vs_local_restore": restore["host_snapshot"] / restore["local_disk"],
                "host_restore_vs_memcpy": restore["host_snapshot"] / cal["memcpy_s"],
                "local_restore_vs_torch_load": restore["local_disk"] / restore["torch_load"],
                "local_restore_vs_dcp_load": restore["local_disk"] / restore["dcp_load"],
                "resharded_vs_local_per_byte": (resh["s"] / resh["bytes"]) / (restore["local_disk"] / nbytes),
                "pool_high_water_vs_budget": pool["high_water"] / pool["budget_bytes"],
                "rss_vs_async_save": rk["added_rss_bytes"] / max(1, da["added_rss_bytes"]),
            },
            "targets": {k: f"<= {v:g}" for k, v in TARGETS.items()},
        }
    )
    r["met"] = {k: r["ratios"][k] <= v for k, v in TARGETS.items()}
    r["runtime_s"] = time.perf_counter() - t_start
    return r


# --------------------------------------------------------------------------- output
def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def table(r: dict[str, Any]) -> str:
    c, st, ra, tg = r["calibration"], r["stall_s"], r["ratios"], r["targets"]
    met = r["met"]

    def mark(k: str) -> str:
        return f"{ra[k]:.3f} (target {tg[k]}: {'met' if met[k] else 'MISSED'})"

    it = r["iteration_s"]
    rs = r["restore_s"]
    mem = r["memory"]
    lines = [
        f"state: {r['bytes'] / 2**30:.2f} GiB ({r['model']['layers']} x {r['model']['width']}^2 MLP + AdamW), "
        f"{r['steps']} counted saves after {r['warmup']} warm-up, {r['iters']} timed iterations"
        + (" [smoke]" if r["smoke"] else ""),
        f"calibration: memcpy of the state {c['memcpy_s'] * 1e3:.1f} ms ({c['memcpy_gb_per_s']:.1f} GB/s); "
        f"batch {c['batch']} -> fwd+bwd {c['fwd_bwd_s'] * 1e3:.1f} ms = {c['fwd_bwd_vs_memcpy']:.2f}x memcpy; "
        f"optimizer step {c['optimizer_step_s'] * 1e3:.1f} ms",
        "",
        "| training stall per checkpoint | median s | max s | recoverkit / this |",
        "|---|---:|---:|---:|",
    ]
    rk = st["recoverkit_save_async"]["median"]
    for k, v in st.items():
        lines.append(f"| {k} | {v['median']:.4f} | {v['max']:.4f} | {rk / v['median']:.4f} |")
    lines += [
        "",
        f"- stall vs torch.save: {mark('stall_vs_torch_save')}",
        f"- stall vs dcp.async_save: {mark('stall_vs_async_save')}",
        "",
        "| iteration | median s | mean s | max s |",
        "|---|---:|---:|---:|",
    ]
    for k in ("no_checkpoint", "save_async_every_step", "save_async_stall"):
        v = it[k]
        lines.append(f"| {k} | {v['median']:.4f} | {v['mean']:.4f} | {v['max']:.4f} |")
    lines += [
        "",
        f"- iteration overhead (median): {mark('iteration_overhead')}",
        "",
        "| restore | seconds | GB/s |",
        "|---|---:|---:|",
    ]
    for k, v in rs.items():
        n = r["restore_detail"]["resharded"]["bytes"] if k == "resharded_local_disk" else r["bytes"]
        lines.append(f"| {k} | {v:.3f} | {n / v / 1e9:.2f} |")
    lines += [
        "",
        *(
            []
            if r["restore_detail"].get("host_snapshot_used", True)
            else [
                f"- WARNING: host-snapshot restore returned steps {r['restore_detail']['host_restored_steps']}, "
                f"not the newest step {r['restore_detail']['host_snapshot_step']} held in memory: that row timed a "
                "fallback to an older step on disk"
            ]
        ),
        f"- page cache dropped before disk restores: {r['restore_detail']['page_cache_dropped']}; "
        f"resharded: {r['restore_detail']['resharded']['layout']}, bit-exact {r['restore_detail']['resharded']['bit_exact']}",
        f"- host / local restore {ra['host_restore_vs_local_restore']:.2f}; host restore / memcpy {ra['host_restore_vs_memcpy']:.2f}; "
        f"local / torch.load {ra['local_restore_vs_torch_load']:.2f}; local / dcp.load {ra['local_restore_vs_dcp_load']:.2f}; "
        f"resharded / local per byte {ra['resharded_vs_local_per_byte']:.2f}",
        "",
        f"| memory ({mem['rss_method']}) | added peak RSS |",
        "|---|---:|",
    ]
    for k, v in mem["added_rss_bytes"].items():
        lines.append(f"| {k} | {_mib(v)} |")
    p = mem["pool"]
    lines += [
        "",
        f"- staging pool high water {_mib(p['high_water'])} of budget {_mib(p['budget_bytes'])}: "
        f"{mark('pool_high_water_vs_budget')}; recoverkit / async_save added RSS {ra['rss_vs_async_save']:.2f}",
        f"- recoverkit saves skipped (pool full): {r['recoverkit_skipped_saves']}; dcp.async_save: {r['dcp_async_options']}",
        f"- runtime {r['runtime_s']:.0f} s",
    ]
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        st = r["stall_s"]
        names = list(st)
        colors = ["tab:blue" if n.startswith("recoverkit") else "tab:gray" for n in names]
        ax1.bar(names, [max(1e-6, st[n]["median"]) for n in names], color=colors)
        ax1.set_yscale("log")
        ax1.set_ylabel("training stall per checkpoint (s, median)")
        ax1.set_title("stall: recoverkit vs torch/DCP", fontsize=9)
        ax1.tick_params(axis="x", labelrotation=20, labelsize=7)
        rs = r["restore_s"]
        keys = list(rs)
        colors = ["tab:gray" if k in ("torch_load", "dcp_load") else "tab:blue" for k in keys]
        ax2.bar(keys, [rs[k] for k in keys], color=colors)
        ax2.set_ylabel("restore time (s)")
        ax2.set_title(f"restore of {r['bytes'] / 2**30:.2f} GiB", fontsize=9)
        ax2.tick_params(axis="x", labelrotation=20, labelsize=7)

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny state, 2 saves, 3 iterations (< 30 s)")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5, help="counted saves per method")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per loop (>= 10)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None, help="default bench/results; smoke runs write nowhere unless given")
    a = ap.parse_args(argv)
    if a.smoke:
        r = run(16, steps=2, warmup=1, iters=3, workdir=a.workdir, smoke=True)
    else:
        r = run(a.size_mib, steps=a.steps, warmup=1, iters=a.iters, workdir=a.workdir)
    text = table(r)
    print(text)
    if a.out_dir or not a.smoke:
        publish("lazy", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
    # gloo's threads can race interpreter shutdown (SIGABRT): leave without running it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
