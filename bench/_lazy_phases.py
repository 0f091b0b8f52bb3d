"""The lazy-checkpoint benchmark's phases: the stall per checkpoint, the iterations, the restores.

Where it sits: between the model (:mod:`bench._lazy_model`) and the report
(:mod:`bench._lazy_report`), called in order by :func:`bench.bench_lazy.run` on one model, one
state and one calibrated batch, inside the 1-process gloo group of :func:`_process_group`. The
flow: 1. the training stall of a checkpoint after every optimizer step, per method:
:func:`_stall_recoverkit` (``save_async``; call + pre-step wait), :func:`_stall_blocking`
(``torch.save``, ``dcp.save``: the whole call) and :func:`_stall_async_save` (``dcp.async_save``
with the reused stager of :func:`_dcp_stager`); 2. :func:`_iterations`: the iteration time
without checkpoints and with ``save_async`` every step, then restores from the host snapshot;
3. restores from disk: :func:`_restore_local`, :func:`_restore_resharded` (1 rank -> rank 1 of
2), :func:`_restore_torch_load`, :func:`_restore_dcp_load`. The peak RSS each method adds in
phase 1 is measured by :class:`_PeakRSS`. Every phase returns its raw figures; ``run`` reduces them.
"""

from __future__ import annotations

import contextlib
import os
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

from ._common import free_port, keep_last
from ._lazy_model import _fwd_bwd, _opt_step, _state_dict
from .bench_limits import drop_caches

__all__ = [
    "_PeakRSS",
    "_process_group",
    "_dcp_stager",
    "_stall_recoverkit",
    "_stall_blocking",
    "_stall_async_save",
    "_iterations",
    "_restore_local",
    "_restore_resharded",
    "_restore_torch_load",
    "_restore_dcp_load",
]


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
