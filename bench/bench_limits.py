"""The hardware's own limits for a given byte count: what no checkpointing library can beat.

On one buffer of ``nbytes`` (default 1 GiB), in one run:

* **memcpy** GB/s: ``np.copyto`` between two preallocated, pre-faulted buffers, on 1 thread and
  on 2 threads (each copies half; NumPy drops the GIL for the copy);
* **write+fsync** GB/s: the same bytes through plain sequential ``os.write`` of 64 MiB pieces
  and one ``fsync`` -- the disk's durable write limit;
* **read** GB/s: the file read back with ``os.readv`` into a preallocated buffer, after
  dropping the page cache (``/proc/sys/vm/drop_caches``) when permitted; when not, the
  result says ``cold: false`` and the figure is a page-cache read;
* **CRC-32C** GB/s of the native engine (hardware instruction where the CPU has it).

Other scenarios call :func:`limits` to show every throughput as a fraction of the limit::

    from bench.bench_limits import limits
    lim = limits(nbytes, workdir)            # {"memcpy_1t_gb_per_s": ..., ...}
    fraction = my_gb_per_s / lim["write_fsync_gb_per_s"]

The primitives it measures with (:func:`buffer`, :func:`memcpy`, :func:`plain_write_fsync`,
:func:`plain_read`, :func:`drop_caches`, :func:`timed`) are the ones every scenario and
``bench/micro`` share; the other shared helpers are in ``bench/_common.py``.

Run: ``python -m bench.bench_limits [--smoke] [--size-mib 1024] [--reps 5] [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .machine import median
from .report import fmt_bytes, publish

__all__ = [
    "limits",
    "main",
    "table",
    "buffer",
    "memcpy",
    "plain_write_fsync",
    "plain_read",
    "drop_caches",
    "timed",
]

_PIECE = 64 << 20


# --------------------------------------------------------------------------- primitives
def buffer(nbytes: int, fill: bool = True) -> np.ndarray:
    """A page-aligned uint8 buffer of ``nbytes``, every page touched (random bytes if fill)."""
    raw = np.empty(nbytes + 4096, dtype=np.uint8)
    off = (-raw.ctypes.data) % 4096
    a = raw[off : off + nbytes]
    if fill:
        rng = np.random.default_rng(0)
        step = 16 << 20
        for i in range(0, nbytes, step):  # in pieces: no second full-size temporary
            n = min(step, nbytes - i)
            a[i : i + n] = rng.integers(0, 256, n, dtype=np.uint8)
    else:
        a[::4096] = 0
    return a


def timed(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def memcpy(dst: np.ndarray, src: np.ndarray, threads: int = 1) -> None:
    """``np.copyto`` of src into dst, split into ``threads`` contiguous parts copied in parallel."""
    if threads <= 1:
        np.copyto(dst, src)
        return
    n = src.nbytes
    bounds = [n * i // threads for i in range(threads + 1)]
    ts = [
        threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b]))
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def plain_write_fsync(path: str, src: np.ndarray) -> None:
    """The disk's limit: sequential ``os.write`` of 64 MiB pieces, then one ``fsync``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        mv = memoryview(src).cast("B")
        while mv:
            mv = mv[os.write(fd, mv[:_PIECE]) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_read(path: str, dst: np.ndarray) -> None:
    """Sequential ``os.readv`` of the whole file into ``dst`` in 64 MiB pieces."""
    fd = os.open(path, os.O_RDONLY)
    try:
        mv = memoryview(dst).cast("B")
        off = 0
        while off < len(mv):
            r = os.preadv(fd, [mv[off : off + _PIECE]], off)
            if r == 0:
                raise OSError(f"{path}: short file")
            off += r
    finally:
        os.close(fd)


def drop_caches() -> bool:
    """Write back and drop the page cache; False when not permitted (then reads are warm)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the limits
def limits(nbytes: int, workdir: str | None = None, reps: int = 3) -> dict[str, Any]:
    """Measures the hardware limits on ``nbytes`` bytes; every ``*_gb_per_s`` is 1e9 bytes/s.

    Args:
        nbytes: bytes per measurement (use the size the caller's figures are about).
        workdir: a directory on the disk to measure (a temporary subdirectory is used and
            removed); default the system temporary directory.
        reps: timed repetitions per figure (the median is reported).

    Returns:
        ``memcpy_1t_gb_per_s``, ``memcpy_2t_gb_per_s``, ``write_fsync_gb_per_s``,
        ``read_gb_per_s`` (+ ``read_cold``: page cache dropped), ``crc32c_gb_per_s``, and the
        raw ``seconds`` of every repetition.
    """
    from recoverkit._native import engine

    nbytes = max(4096, int(nbytes) // 4096 * 4096)
    src = buffer(nbytes)
    dst = buffer(nbytes, fill=False)
    secs: dict[str, list[float]] = {}
    secs["memcpy_1t"] = timed(lambda: memcpy(dst, src, 1), reps)
    secs["memcpy_2t"] = timed(lambda: memcpy(dst, src, 2), reps)
    secs["crc32c"] = timed(lambda: engine.crc32c(src), reps)
    base = tempfile.mkdtemp(prefix="rk-bench-limits-", dir=workdir)
    path = os.path.join(base, "plain.bin")
    cold = True
    try:
        secs["write_fsync"] = timed(lambda: plain_write_fsync(path, src), reps)
        reads = []
        for _ in range(reps):
            cold = drop_caches() and cold
            t = time.perf_counter()
            plain_read(path, dst)
            reads.append(time.perf_counter() - t)
        secs["read"] = reads
        if not np.array_equal(dst[:: 1 << 20], src[:: 1 << 20]):
            raise AssertionError("read back different bytes")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out: dict[str, Any] = {"bytes": nbytes, "reps": reps}
    for k, v in secs.items():
        out[f"{k}_gb_per_s"] = nbytes / median(v) / 1e9
    out["read_cold"] = cold
    out["engine"] = engine.BACKEND
    out["hardware_crc32c"] = bool(engine.hardware_crc32c())
    out["seconds"] = secs
    return out


ROWS = [
    ("memcpy_1t", "memcpy, 1 thread (np.copyto)"),
    ("memcpy_2t", "memcpy, 2 threads (np.copyto halves)"),
    ("write_fsync", "sequential write + fsync (os.write 64 MiB pieces)"),
    ("read", "sequential read (os.preadv)"),
    ("crc32c", "CRC-32C (recoverkit engine)"),
]


def table(r: dict[str, Any]) -> str:
    lines = [
        f"bytes: {fmt_bytes(r['bytes'])}, median of {r['reps']}" + (" [smoke]" if r.get("smoke") else ""),
        "",
        "| limit | GB/s | median s |",
        "|---|---:|---:|",
    ]
    for k, label in ROWS:
        lines.append(f"| {label} | {r[f'{k}_gb_per_s']:.2f} | {median(r['seconds'][k]):.4f} |")
    lines += [
        "",
        f"- read: page cache dropped before each read: {r['read_cold']}"
        + ("" if r["read_cold"] else " (not permitted: the read figure is a page-cache read)"),
        f"- CRC-32C engine: {r['engine']}, hardware instruction: {r['hardware_crc32c']}",
    ]
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        labels = [k for k, _ in ROWS]
        vals = [r[f"{k}_gb_per_s"] for k in labels]
        ax.bar(labels, vals, color="tab:gray")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
        ax.set_ylabel("GB/s")
        ax.set_title(f"hardware limits on {fmt_bytes(r['bytes'])}")

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="16 MiB, 1 repetition (< 30 s)")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workdir", default=None, help="directory on the disk to measure")
    ap.add_argument("--out-dir", default=None, help="default bench/results; smoke runs write nowhere unless given")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    size, reps = (16, 1) if a.smoke else (a.size_mib, a.reps)
    r = limits(size << 20, a.workdir, reps)
    r["scenario"] = "limits"
    r["smoke"] = a.smoke
    r["runtime_s"] = time.perf_counter() - t0
    text = table(r)
    print(text)
    if a.out_dir or not a.smoke:
        publish("limits", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
