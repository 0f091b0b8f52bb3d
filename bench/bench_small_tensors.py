"""Many small tensors: save, restore and disk size vs torch.save / torch.load.

A state of ``--count`` tensors of 4 float32 each (default 100,000: 1.5 MiB of data) stresses
what is paid per tensor rather than per byte: planning, the segment layout, the manifest.
In one run, on the same state:

* recoverkit ``Checkpointer.save`` (blocking: fsync'ed and committed) and ``save_async`` +
  ``wait`` (staged in the host pool, then committed) vs ``torch.save`` + ``fsync`` (the same
  durability) and plain ``torch.save`` (page cache only);
* ``Checkpointer.restore`` from disk (a fresh Checkpointer, as after a restart; every byte
  CRC-verified) vs ``torch.load``;
* the bytes on disk: the step directory (segment file + manifest), the segment file alone,
  the manifest, the object tree (blob) inside the segment, and ``torch.save``'s file, next to
  the tensors' own bytes;
* the manifest's own cost: encoding (``Manifest.to_bytes``) and parsing + verifying
  (``Manifest.from_bytes``) the committed manifest, as a share of the save and the restore.

Every time is the median of ``--reps`` repetitions. recoverkit keeps one step
(``keep_last=1``), so each save also deletes the previous one, as in ``bench_save``.

Run: ``python -m bench.bench_small_tensors [--smoke] [--count 100000] [--reps 3] [--out-dir DIR]``
(publishes ``small_tensors.json``, ``.md`` and ``.png`` to ``bench/results`` by default; smoke
runs write nowhere unless ``--out-dir`` is given).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy
from recoverkit.format.manifest import MANIFEST_NAME, Manifest
from recoverkit.format.segment import segment_name

from ._common import fsync_file, tree_bytes
from .bench_limits import drop_caches
from .machine import describe, median
from .report import fmt_bytes, publish

NAME = "small_tensors"
TARGETS = {"save_vs_torch_save_fsync": "<= 1.0", "disk_vs_data": "<= 1.2"}
TIMES = ("recoverkit_save", "recoverkit_save_async_wait", "torch_save", "torch_save_fsync",
         "recoverkit_restore", "torch_load", "manifest_encode", "manifest_decode")


def make_state(count: int, numel: int = 4) -> dict[str, torch.Tensor]:
    """``count`` float32 tensors of ``numel`` elements under keys ``t0``, ``t1``, ..."""
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(numel, generator=g) for i in range(count)}


def run(count: int = 100_000, reps: int = 3, workdir: str | None = None) -> dict[str, Any]:
    state = make_state(count)
    data = sum(t.numel() * t.element_size() for t in state.values())
    base = tempfile.mkdtemp(prefix="rk-bench-small-", dir=workdir)
    times: dict[str, list[float]] = {k: [] for k in TIMES}
    laps: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    opts = CheckpointOptions(retention=RetentionPolicy(keep_last=1))
    root = os.path.join(base, "rk")
    tpath = os.path.join(base, "torch.pt")
    try:
        _warm_up(os.path.join(base, "warm"), opts)
        step = 0
        for _ in range(reps):
            with Checkpointer(root, options=opts) as ckpt:
                step += 1
                t = time.perf_counter()
                res = ckpt.save(step, {"s": state})
                times["recoverkit_save"].append(time.perf_counter() - t)
                for k, v in res.timings_s.items():
                    laps.setdefault(k, []).append(v)
                step += 1
                t = time.perf_counter()
                ckpt.save_async(step, {"s": state})
                if not ckpt.wait(timeout_s=3600):
                    raise TimeoutError(f"save_async of step {step} not settled after an hour")
                times["recoverkit_save_async_wait"].append(time.perf_counter() - t)
            step_dir = os.path.join(root, f"step-{step:09d}")
            raw = open(os.path.join(step_dir, MANIFEST_NAME), "rb").read()
            t = time.perf_counter()
            manifest = Manifest.from_bytes(raw)
            times["manifest_decode"].append(time.perf_counter() - t)
            t = time.perf_counter()
            manifest.to_bytes()
            times["manifest_encode"].append(time.perf_counter() - t)
            sizes = {
                "step_dir": tree_bytes(step_dir),
                "segment": os.path.getsize(os.path.join(step_dir, segment_name(0))),
                "manifest": len(raw),
                "blob": manifest.blob_for(0).nbytes,
            }

            t = time.perf_counter()
            torch.save(state, tpath)
            times["torch_save"].append(time.perf_counter() - t)
            fsync_file(tpath)
            os.unlink(tpath)
            t = time.perf_counter()
            torch.save(state, tpath)
            fsync_file(tpath)
            times["torch_save_fsync"].append(time.perf_counter() - t)
            sizes["torch_file"] = os.path.getsize(tpath)

            target = {"s": {k: torch.empty(4) for k in state}}
            drop_caches()
            with Checkpointer(root, options=opts) as ckpt:  # a restart's view: disk only
                t = time.perf_counter()
                ckpt.restore(target)
                times["recoverkit_restore"].append(time.perf_counter() - t)
            if not all(torch.equal(target["s"][k], v) for k, v in state.items()):
                raise AssertionError("restored tensors differ from the saved ones")
            del target
            drop_caches()
            t = time.perf_counter()
            loaded = torch.load(tpath, weights_only=True)
            times["torch_load"].append(time.perf_counter() - t)
            del loaded
            os.unlink(tpath)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: median(v) for k, v in times.items()}
    return {
        "scenario": NAME,
        "machine": describe(workdir or tempfile.gettempdir()),
        "count": count,
        "numel_per_tensor": 4,
        "data_bytes": data,
        "reps": reps,
        "seconds_median": med,
        "seconds_all": times,
        "save_laps_median": {k: median(v) for k, v in laps.items()},
        "bytes": sizes,
        "ratios": {
            "save_vs_torch_save_fsync": med["recoverkit_save"] / med["torch_save_fsync"],
            "save_async_wait_vs_torch_save_fsync": med["recoverkit_save_async_wait"] / med["torch_save_fsync"],
            "save_vs_torch_save": med["recoverkit_save"] / med["torch_save"],
            "restore_vs_torch_load": med["recoverkit_restore"] / med["torch_load"],
            "disk_vs_data": sizes["step_dir"] / data,
            "segment_vs_data": sizes["segment"] / data,
            "torch_file_vs_data": sizes["torch_file"] / data,
            "manifest_encode_share_of_save": med["manifest_encode"] / med["recoverkit_save"],
            "manifest_decode_share_of_restore": med["manifest_decode"] / med["recoverkit_restore"],
        },
        "targets": dict(TARGETS),
    }


def _warm_up(path: str, opts: CheckpointOptions) -> None:
    """One tiny save and load each way first: imports and first-call costs stay out of the figures."""
    tiny = make_state(4)
    with Checkpointer(os.path.join(path, "rk"), options=opts) as ckpt:
        ckpt.save(1, {"s": tiny})
        ckpt.save_async(2, {"s": tiny})
        ckpt.wait(timeout_s=600)
        ckpt.restore({"s": {k: torch.empty(4) for k in tiny}})
    torch.save(tiny, os.path.join(path, "t.pt"))
    torch.load(os.path.join(path, "t.pt"), weights_only=True)
    shutil.rmtree(path, ignore_errors=True)


def _met(value: float, target: str) -> bool:
    bound = float(target.split()[-1])
    return value <= bound if target.startswith("<=") else value >= bound


def table(r: dict[str, Any]) -> str:
    med, b, data = r["seconds_median"], r["bytes"], r["data_bytes"]
    lines = [
        f"state: {r['count']:,} tensors of {r['numel_per_tensor']} float32 ({fmt_bytes(data)} of data), "
        f"median of {r['reps']}" + (" [smoke]" if r.get("smoke") else ""),
        "",
        "| operation | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {med[k]:.3f} |" for k in TIMES]
    lines += ["", "| bytes | size | x data |", "|---|---:|---:|"]
    for k in ("step_dir", "segment", "blob", "manifest", "torch_file"):
        lines.append(f"| {k} | {fmt_bytes(b[k])} | {b[k] / data:.2f} |")
    lines += [
        "",
        "- recoverkit_save phases (median s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in r.get("save_laps_median", {}).items()),
        "- step_dir = segment (object tree + packed tensor bytes) + manifest; manifest_encode / "
        "manifest_decode: `Manifest.to_bytes` / `from_bytes` of the committed manifest",
    ]
    for k, v in r["ratios"].items():
        target = r["targets"].get(k)
        lines.append(f"- {k}: {v:.2f}" + (f" (target {target}: {'met' if _met(v, target) else 'MISSED'})" if target else ""))
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax_t, ax_b = fig.subplots(1, 2)
        med = r["seconds_median"]
        keys = [k for k in TIMES if not k.startswith("manifest")]
        colors = ["tab:blue" if k.startswith("recoverkit") else "tab:orange" for k in keys]
        ax_t.barh(keys[::-1], [med[k] for k in keys][::-1], color=colors[::-1])
        ax_t.set_xlabel("seconds (blue: recoverkit, orange: torch)")
        b = r["bytes"]
        names = ["data", "segment", "manifest", "step_dir", "torch_file"]
        vals = [r["data_bytes"]] + [b[k] for k in names[1:]]
        ax_b.barh(names[::-1], [v / 2**20 for v in vals][::-1], color="tab:gray")
        ax_b.set_xlabel("MiB on disk")
        fig.suptitle(f"{r['count']:,} tensors of 4 float32")

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="2,000 tensors, one repetition")
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None, help="default bench/results; smoke runs write nowhere unless given")
    a = ap.parse_args(argv)
    r = run(2000 if a.smoke else a.count, 1 if a.smoke else a.reps, a.workdir)
    r["smoke"] = a.smoke
    text = table(r)
    print(text)
    if a.out_dir or not a.smoke:
        publish(NAME, r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
