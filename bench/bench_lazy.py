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

Modules, by stage: :mod:`bench._lazy_model` (the model, its state, the calibrated batch),
:mod:`bench._lazy_phases` (peak RSS, the gloo group and DCP's stager, then the three phases:
stall, iterations, restores), :mod:`bench._lazy_report` (table, plot); this module runs them
(:func:`run`), holds the targets and the command line (:func:`main`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from ._common import fsync_file
from ._lazy_model import (
    FWD_BWD_PER_MEMCPY,
    LAYERS,
    _calibrate,
    _model,
    _nbytes,
    _state_dict,
    _tensors,
)
from ._lazy_phases import (
    _iterations,
    _process_group,
    _restore_dcp_load,
    _restore_local,
    _restore_resharded,
    _restore_torch_load,
    _stall_async_save,
    _stall_blocking,
    _stall_recoverkit,
)
from ._lazy_report import _plot, table
from .machine import describe, median
from .report import publish

__all__ = ["TARGETS", "FWD_BWD_PER_MEMCPY", "LAYERS", "run", "table", "main"]

TARGETS = {
    "stall_vs_torch_save": 0.02,
    "stall_vs_async_save": 0.10,
    "iteration_overhead": 0.05,
    "pool_high_water_vs_budget": 1.0,
}


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": median(xs), "mean": sum(xs) / len(xs), "max": max(xs), "min": min(xs), "n": len(xs)}


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
