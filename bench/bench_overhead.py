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
  cached host storages, thread checkpointer; see ``bench._lazy_phases._dcp_stager``) on a dedicated
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

Modules, by stage: :mod:`bench._overhead_methods` (the method names, one class per method, the
memory tiers), :mod:`bench._overhead_world` (peak host memory, the training loop and its windows,
one cell's ranks in spawned gloo processes), :mod:`bench._overhead_report` (table, plot); the
model and the calibration are ``bench_lazy``'s (:mod:`bench._lazy_model`). This module runs the
cells (:func:`run`) and holds the command line (:func:`main`).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from ._overhead_methods import METHODS, OPT_IN, TORCHFT, memory_tiers
from ._overhead_report import COLORS, _plot, table
from ._overhead_world import dir_bytes, run_world
from .machine import median
from .report import publish

# every public name importable from here before the split into stage modules, still importable
__all__ = [
    "METHODS",
    "TORCHFT",
    "DEFAULT_SIZES",
    "DEFAULT_INTERVALS",
    "OPT_IN",
    "COLORS",
    "memory_tiers",
    "dir_bytes",
    "run_world",
    "run",
    "table",
    "main",
]

DEFAULT_SIZES = (256, 1024, 2304)
DEFAULT_INTERVALS = (1, 10, 100)


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
