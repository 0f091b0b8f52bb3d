"""Save and restore of a whole training state vs torch.save / torch.load and the disk.

On the same state (default 1 GiB: a model's float32 parameters plus AdamW's two moments),
in one run:

* recoverkit ``Checkpointer.save`` (fsync'ed, committed) vs ``torch.save`` (page cache only,
  as users call it) and ``torch.save`` + ``fsync`` (the same durability as recoverkit);
* the disk's limits: the same bytes through plain ``os.write`` + ``fsync`` (buffered, as most
  tools write), and through ``O_DIRECT`` writes of 8 MiB from page-aligned memory with two in
  flight + ``fsync`` (the fastest durable write this disk takes; the bytes are copied into
  the aligned buffer before the clock starts);
* ``Checkpointer.restore`` (every byte CRC-verified, applied to live objects) vs
  ``torch.load`` + ``load_state_dict``.

Every figure is the median of ``--reps`` repetitions on the same state; ratios compare recoverkit
with the torch call of the same durability and with the disk's limits. recoverkit's save
includes its retention (``keep_last=1``: deleting the previous step); its phases are reported
too (``save_laps_median``).

Run: ``python -m bench.bench_save [--smoke] [--size-mib 1024] [--reps 3] [--out-dir DIR]``
(publishes ``save.json``, ``save.md`` and ``save.png`` to ``bench/results`` by default; smoke runs
write nowhere unless ``--out-dir`` is given).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from recoverkit import Checkpointer, CheckpointOptions, RetentionPolicy

from ._common import fsync_file
from .bench_limits import buffer, drop_caches
from .machine import describe, median
from .report import publish


def _state(total_mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    # parameters + 2 AdamW moments = 3x parameter bytes
    per_param_mib = max(1, total_mib // 3 // 8)
    torch.manual_seed(0)
    side = int((per_param_mib * 2**20 / 4) ** 0.5)
    model = torch.nn.Sequential(*[torch.nn.Linear(side, side, bias=False) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


def _nbytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for s in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v))
    return n


def _plain_write(path: str, tensors: list[torch.Tensor]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in tensors:
            mv = memoryview(t.detach().contiguous().view(-1).view(torch.uint8).numpy())
            while mv:
                mv = mv[os.write(fd, mv[: 64 << 20]) :]
        os.fsync(fd)
    finally:
        os.close(fd)


_DIRECT_PIECE = 8 << 20


def _aligned_copy(tensors: list[torch.Tensor]) -> np.ndarray:
    """The tensors' bytes back to back in page-aligned memory, padded to 4 KiB (O_DIRECT)."""
    views = [t.detach().contiguous().view(-1).view(torch.uint8).numpy() for t in tensors]
    buf = buffer(max(4096, -(-sum(v.size for v in views) // 4096) * 4096), fill=False)
    pos = 0
    for v in views:
        buf[pos : pos + v.size] = v
        pos += v.size
    return buf


def _direct_write(path: str, buf: np.ndarray, pool: ThreadPoolExecutor) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        mv = memoryview(buf)

        def put(off: int) -> None:
            piece = mv[off : off + _DIRECT_PIECE]
            while piece:
                n = os.pwrite(fd, piece, off)
                piece, off = piece[n:], off + n

        list(pool.map(put, range(0, len(buf), _DIRECT_PIECE)))
        os.fsync(fd)
    finally:
        os.close(fd)


def run(size_mib: int = 1024, reps: int = 3, workdir: str | None = None) -> dict[str, Any]:
    model, opt = _state(size_mib)
    nbytes = _nbytes(model, opt)
    tensors = list(model.parameters()) + [v for s in opt.state.values() for v in s.values() if v.dim() > 0]
    base = tempfile.mkdtemp(prefix="rk-bench-save-", dir=workdir)
    times: dict[str, list[float]] = {k: [] for k in (
        "recoverkit_save", "torch_save", "torch_save_fsync", "plain_write_fsync", "direct_write_fsync",
        "recoverkit_restore", "torch_load")}
    laps: dict[str, list[float]] = {}
    aligned = _aligned_copy(tensors)
    pool = ThreadPoolExecutor(2)
    try:
        opts = CheckpointOptions(retention=RetentionPolicy(keep_last=1))
        with Checkpointer(os.path.join(base, "rk"), options=opts) as ckpt:
            for rep in range(reps):
                state = {"model": model, "optimizer": opt}
                t = time.perf_counter()
                res = ckpt.save(rep, state)
                times["recoverkit_save"].append(time.perf_counter() - t)
                for k, v in res.timings_s.items():
                    laps.setdefault(k, []).append(v)

                path = os.path.join(base, "torch.pt")
                t = time.perf_counter()
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
                times["torch_save"].append(time.perf_counter() - t)
                fsync_file(path)
                os.unlink(path)
                t = time.perf_counter()
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
                fsync_file(path)
                times["torch_save_fsync"].append(time.perf_counter() - t)

                t = time.perf_counter()
                _plain_write(os.path.join(base, "plain.bin"), tensors)
                times["plain_write_fsync"].append(time.perf_counter() - t)
                os.unlink(os.path.join(base, "plain.bin"))
                t = time.perf_counter()
                _direct_write(os.path.join(base, "direct.bin"), aligned, pool)
                times["direct_write_fsync"].append(time.perf_counter() - t)
                os.unlink(os.path.join(base, "direct.bin"))

                drop_caches()
                t = time.perf_counter()
                ckpt.restore(state)
                times["recoverkit_restore"].append(time.perf_counter() - t)
                drop_caches()
                t = time.perf_counter()
                sd = torch.load(path, weights_only=True)
                model.load_state_dict(sd["model"])
                opt.load_state_dict(sd["optimizer"])
                times["torch_load"].append(time.perf_counter() - t)
                del sd
                os.unlink(path)
    finally:
        pool.shutdown()
        shutil.rmtree(base, ignore_errors=True)
    med = {k: median(v) for k, v in times.items()}
    gbps = {k: nbytes / v / 1e9 for k, v in med.items()}
    return {
        "scenario": "save_restore",
        "machine": describe(workdir or tempfile.gettempdir()),
        "bytes": nbytes,
        "reps": reps,
        "seconds_median": med,
        "seconds_all": times,
        "save_laps_median": {k: median(v) for k, v in laps.items()},
        "gb_per_s": gbps,
        "ratios": {
            "save_vs_torch_save": med["recoverkit_save"] / med["torch_save"],
            "save_vs_torch_save_fsync": med["recoverkit_save"] / med["torch_save_fsync"],
            "save_vs_disk_limit": med["plain_write_fsync"] / med["recoverkit_save"],
            "save_vs_direct_write_limit": med["direct_write_fsync"] / med["recoverkit_save"],
            "restore_vs_torch_load": med["recoverkit_restore"] / med["torch_load"],
        },
        "targets": {"save_vs_torch_save": "<= 0.6"},
    }


def table(r: dict[str, Any]) -> str:
    med, g = r["seconds_median"], r["gb_per_s"]
    lines = [
        f"state: {r['bytes'] / 2**30:.2f} GiB, median of {r['reps']}" + (" [smoke]" if r.get("smoke") else ""),
        "",
        "| operation | seconds | GB/s |",
        "|---|---:|---:|",
    ]
    for k in med:
        lines.append(f"| {k} | {med[k]:.3f} | {g[k]:.2f} |")
    lines.append("")
    lines.append(
        "- recoverkit_save phases (median s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in r.get("save_laps_median", {}).items())
        + " (retention: deleting the previous step, keep_last=1)"
    )
    lines.append(
        "- save_vs_disk_limit / save_vs_direct_write_limit: the disk's time for the same bytes over"
        " recoverkit's (1.00 = recoverkit saves at the disk's speed)"
    )
    for k, v in r["ratios"].items():
        target = r["targets"].get(k)
        if target:
            bound = float(target.split()[-1])
            ok = v <= bound if target.startswith("<=") else v >= bound
            lines.append(f"- {k}: {v:.2f} (target {target}: {'met' if ok else 'MISSED'})")
        else:
            lines.append(f"- {k}: {v:.2f}")
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        g = r["gb_per_s"]
        keys = list(g)
        colors = ["tab:blue" if k.startswith("recoverkit") else "tab:gray" if k in ("plain_write_fsync", "direct_write_fsync") else "tab:orange" for k in keys]
        ax.barh(keys[::-1], [g[k] for k in keys][::-1], color=colors[::-1])
        ax.set_xlabel("GB/s (blue: recoverkit, orange: torch, gray: the disk's limit)")
        ax.set_title(f"save / restore of a {r['bytes'] / 2**30:.2f} GiB training state")

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="8 MiB state, one repetition")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=None, help="default bench/results; smoke runs write nowhere unless given")
    a = ap.parse_args(argv)
    r = run(8 if a.smoke else a.size_mib, 1 if a.smoke else a.reps, a.workdir)
    r["smoke"] = a.smoke
    text = table(r)
    print(text)
    if a.out_dir or not a.smoke:
        publish("save", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
