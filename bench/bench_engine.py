"""The native copy/IO engine against the plain operations it replaces, on the same bytes.

On one buffer (default 1 GiB of random bytes), in one run:

* **copy**: ``CopyEngine`` (1 and 2 threads, with and without CRC-32C on the fly; the buffer
  submitted in 64 MiB pieces, as the save pipeline does) vs ``np.copyto`` on 1 thread.
  Target: the 1-thread engine copy without CRC >= 0.9x ``np.copyto``.
* **CRC-32C**: the native ``crc32c`` vs the pure-Python fallback's (``google_crc32c``),
  loaded with ``recoverkit._native.load("python")``.
* **segment write + fsync**: ``write_segment`` of the buffer's 64 MiB pieces into one file,
  buffered and ``O_DIRECT``, vs plain sequential ``os.write`` + ``fsync`` of the same bytes
  (the disk's limit). Target: each >= 0.9x the plain write.
* **segment read with verification**: ``read_segment`` with every piece's expected CRC,
  page cache dropped first when permitted, vs a plain sequential read of the same file.

Run: ``python -m bench.bench_engine [--smoke] [--size-mib 1024] [--reps 5] [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from recoverkit._native import engine as native
from recoverkit._native import load

from .bench_limits import buffer, drop_caches, memcpy, plain_read, plain_write_fsync, timed
from .machine import median
from .report import fmt_bytes, publish

TARGETS = {
    "copy_1t_vs_numpy": 0.9,
    "segment_write_vs_plain": 0.9,
    "segment_write_direct_vs_plain": 0.9,
}
PIECE = 64 << 20


def _pieces(nbytes: int, piece: int = PIECE) -> list[tuple[int, int]]:
    return [(off, min(piece, nbytes - off)) for off in range(0, nbytes, piece)]


def _engine_copy(eng: Any, src: int, dst: int, pieces: list[tuple[int, int]], crc: bool) -> list[int]:
    handles = [eng.submit(src + off, dst + off, n, crc=crc) for off, n in pieces]
    return [h.result() for h in handles]


def run(size_mib: int = 1024, reps: int = 5, workdir: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    nbytes = max(1, size_mib) << 20
    src = buffer(nbytes)
    dst = buffer(nbytes, fill=False)
    sp, dp = src.ctypes.data, dst.ctypes.data
    pieces = _pieces(nbytes)
    py = load("python")
    secs: dict[str, list[float]] = {}

    # copies
    secs["numpy_copyto_1t"] = timed(lambda: memcpy(dst, src, 1), reps)
    crcs_ok = True
    for threads in (1, 2):
        with native.CopyEngine(num_threads=threads) as eng:
            for crc in (False, True):
                key = f"engine_copy_{threads}t" + ("_crc" if crc else "")
                secs[key] = timed(lambda e=eng, c=crc: _engine_copy(e, sp, dp, pieces, c), reps)  # type: ignore[misc]
                if crc:
                    got = _engine_copy(eng, sp, dp, pieces, True)
                    want = [native.crc32c_ptr(sp + off, n) for off, n in pieces]
                    crcs_ok = crcs_ok and got == want
    copy_ok = bool(np.array_equal(dst, src))

    # CRC-32C
    secs["crc32c_native"] = timed(lambda: native.crc32c(src), reps)
    secs["crc32c_python"] = timed(lambda: py.crc32c(src), reps)
    crc_agree = native.crc32c(src) == py.crc32c(src)
    piece_crcs = [native.crc32c_ptr(sp + off, n) for off, n in pieces]

    # segment write + fsync, and read with verification
    base = tempfile.mkdtemp(prefix="rk-bench-engine-", dir=workdir)
    cold = True
    try:
        plain = os.path.join(base, "plain.bin")
        seg = os.path.join(base, "segment.bin")
        items = [(off, sp + off, n) for off, n in pieces]
        secs["plain_write_fsync"] = timed(lambda: plain_write_fsync(plain, src), reps)
        secs["segment_write_fsync"] = timed(lambda: native.write_segment(seg, items, direct=False), reps)
        secs["segment_write_direct_fsync"] = timed(lambda: native.write_segment(seg, items, direct=True), reps)
        ritems = [(off, dp + off, n, c) for (off, n), c in zip(pieces, piece_crcs)]
        reads: dict[str, list[float]] = {"plain_read": [], "segment_read_verify": []}
        for _ in range(reps):
            for key, fn in (
                ("plain_read", lambda: plain_read(plain, dst)),
                ("segment_read_verify", lambda: native.read_segment(seg, ritems)),
            ):
                cold = drop_caches() and cold
                t = time.perf_counter()
                fn()
                reads[key].append(time.perf_counter() - t)
        secs.update(reads)
        read_ok = bool(np.array_equal(dst, src))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    med = {k: median(v) for k, v in secs.items()}
    gbps = {k: nbytes / v / 1e9 for k, v in med.items()}
    ratios = {
        "copy_1t_vs_numpy": gbps["engine_copy_1t"] / gbps["numpy_copyto_1t"],
        "copy_1t_crc_vs_numpy": gbps["engine_copy_1t_crc"] / gbps["numpy_copyto_1t"],
        "copy_2t_vs_numpy": gbps["engine_copy_2t"] / gbps["numpy_copyto_1t"],
        "copy_2t_crc_vs_numpy": gbps["engine_copy_2t_crc"] / gbps["numpy_copyto_1t"],
        "crc32c_native_vs_python": gbps["crc32c_native"] / gbps["crc32c_python"],
        "segment_write_vs_plain": gbps["segment_write_fsync"] / gbps["plain_write_fsync"],
        "segment_write_direct_vs_plain": gbps["segment_write_direct_fsync"] / gbps["plain_write_fsync"],
        "segment_read_verify_vs_plain_read": gbps["segment_read_verify"] / gbps["plain_read"],
    }
    return {
        "scenario": "engine",
        "bytes": nbytes,
        "reps": reps,
        "piece_bytes": PIECE,
        "engine": native.BACKEND,
        "hardware_crc32c": bool(native.hardware_crc32c()),
        "seconds_median": med,
        "seconds_all": secs,
        "gb_per_s": gbps,
        "ratios": ratios,
        "targets": {k: f">= {v:g}" for k, v in TARGETS.items()},
        "met": {k: ratios[k] >= v for k, v in TARGETS.items()},
        "read_cold": cold,
        "checks": {"copy_bytes_equal": copy_ok, "copy_crc_equal": crcs_ok, "crc_backends_agree": crc_agree, "read_bytes_equal": read_ok},
        "runtime_s": time.perf_counter() - t0,
    }


ROWS = [
    ("numpy_copyto_1t", "np.copyto, 1 thread (reference)", "numpy_copyto_1t"),
    ("engine_copy_1t", "CopyEngine, 1 thread", "numpy_copyto_1t"),
    ("engine_copy_1t_crc", "CopyEngine, 1 thread, CRC on the fly", "numpy_copyto_1t"),
    ("engine_copy_2t", "CopyEngine, 2 threads", "numpy_copyto_1t"),
    ("engine_copy_2t_crc", "CopyEngine, 2 threads, CRC on the fly", "numpy_copyto_1t"),
    ("crc32c_python", "crc32c, Python fallback (reference)", "crc32c_python"),
    ("crc32c_native", "crc32c, native", "crc32c_python"),
    ("plain_write_fsync", "os.write + fsync (reference: the disk)", "plain_write_fsync"),
    ("segment_write_fsync", "write_segment + fsync, buffered", "plain_write_fsync"),
    ("segment_write_direct_fsync", "write_segment + fsync, O_DIRECT", "plain_write_fsync"),
    ("plain_read", "os.preadv (reference)", "plain_read"),
    ("segment_read_verify", "read_segment, every CRC verified", "plain_read"),
]


def table(r: dict[str, Any]) -> str:
    g, med = r["gb_per_s"], r["seconds_median"]
    lines = [
        f"bytes: {fmt_bytes(r['bytes'])} in {fmt_bytes(r['piece_bytes'])} pieces, median of {r['reps']}, "
        f"engine {r['engine']} (hardware CRC {r['hardware_crc32c']})" + (" [smoke]" if r.get("smoke") else ""),
        "",
        "| operation | GB/s | median s | vs reference |",
        "|---|---:|---:|---:|",
    ]
    for key, label, ref in ROWS:
        lines.append(f"| {label} | {g[key]:.2f} | {med[key]:.4f} | {g[key] / g[ref]:.2f}x |")
    lines.append("")
    for k, v in r["ratios"].items():
        if k in TARGETS:
            lines.append(f"- {k}: {v:.2f} (target {r['targets'][k]}: {'met' if r['met'][k] else 'MISSED'})")
        else:
            lines.append(f"- {k}: {v:.2f}")
    lines.append(
        f"- page cache dropped before each read: {r['read_cold']}; checks: "
        + ", ".join(f"{k} {v}" for k, v in r["checks"].items())
    )
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        g = r["gb_per_s"]
        labels = [label for _, label, _ in ROWS]
        vals = [g[k] for k, _, _ in ROWS]
        colors = ["tab:gray" if k == ref else "tab:blue" for k, _, ref in ROWS]
        ax.barh(labels[::-1], vals[::-1], color=colors[::-1])
        ax.set_xlabel("GB/s (gray: the reference each group is compared against)")
        ax.set_title(f"copy/IO engine on {fmt_bytes(r['bytes'])}")
        ax.tick_params(axis="y", labelsize=7)

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="16 MiB, 1 repetition (< 30 s)")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workdir", default=None, help="directory on the disk to measure")
    ap.add_argument("--out-dir", default=None, help="default bench/results; smoke runs write nowhere unless given")
    a = ap.parse_args(argv)
    r = run(16, 1, a.workdir) if a.smoke else run(a.size_mib, a.reps, a.workdir)
    r["smoke"] = a.smoke
    text = table(r)
    print(text)
    if a.out_dir or not a.smoke:
        publish("engine", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
