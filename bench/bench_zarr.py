"""Tier 3 write throughput: a zarr v3 step through tensorstore vs a plain write + fsync.

One state (default 512 MiB of random float32 in 8 tensors, the shape of a model's parameters)
is committed as one persistent-tier step (``ZarrTier``: prepare -> write_rank -> manifest),
and the same bytes are written with a plain sequential ``write`` + ``fsync`` of one file (the
hardware's own limit). Both are durable when the clock stops. Measured in one run, methods
interleaved per repeat, median of ``--repeats``:

* ``plain_write_fsync``: one file, ``os.write`` from the tensors' memory, ``fsync`` file + dir;
* ``zarr_raw``: the tier with no compression (bytes + crc32c codecs); target >= 0.8x plain;
* ``zarr_zstd`` (level 1) and ``zarr_blosc`` (lz4, byte shuffle, level 1): with compression,
  and the bytes they put on disk.

The last raw step is read back through the tier and compared bit for bit.

Run: ``python -m bench.bench_zarr [--smoke] [--size-mib 512] [--repeats 3] [--workdir DIR]
[--out-dir DIR]`` (publishes ``zarr.json``, ``zarr.md``, ``zarr.png`` to ``bench/results`` by
default; smoke runs write nowhere unless ``--out-dir`` is given).
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

from recoverkit.config import TierPolicy
from recoverkit.format.checksum import crc32c_ptr
from recoverkit.format.manifest import Manifest, ShardRecord
from recoverkit.state.dtypes import to_bytes_view
from recoverkit.storage.base import RankPayload, ShardData, ShardMeta
from recoverkit.storage.zarr_tier import ZarrTier

from ._common import fsync_dir, tree_bytes
from .machine import median
from .report import fmt_bytes, publish

TARGETS = {"raw_vs_plain": 0.8}
METHODS = ("plain_write_fsync", "zarr_raw", "zarr_zstd", "zarr_blosc")
COMPRESSION = {"zarr_raw": "none", "zarr_zstd": "zstd", "zarr_blosc": "blosc"}
TENSORS = 8


def make_state(size_mib: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``TENSORS`` random float32 matrices of about ``size_mib`` MiB in all."""
    g = torch.Generator().manual_seed(seed)
    cols = 1024
    rows = max(1, (size_mib << 20) // (TENSORS * cols * 4))
    return {f"model/layers.{i}.weight": torch.randn(rows, cols, generator=g) for i in range(TENSORS)}


def plain_write_fsync(state: dict[str, torch.Tensor], path: str) -> float:
    """Seconds to write every tensor's bytes to one file and fsync it and its directory."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for t in state.values():
            view = memoryview(to_bytes_view(t).numpy())
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))
    return time.perf_counter() - t0


def _payload(state: dict[str, torch.Tensor]) -> RankPayload:
    """Rank 0's payload with checksums precomputed (the stager computes them while copying)."""
    shards = []
    for key, t in state.items():
        raw = to_bytes_view(t)
        crc = crc32c_ptr(int(raw.data_ptr()), raw.numel())
        shape = tuple(t.shape)
        shards.append(ShardData(key, "float32", shape, (0,) * len(shape), shape, raw, crc))
    return RankPayload(0, b"{}", shards)


def zarr_write(state: dict[str, torch.Tensor], url: str, compression: str, step: int) -> float:
    """Seconds to commit ``state`` as one tier-3 step (prepare, write_rank, manifest)."""
    tier = ZarrTier(url, options=TierPolicy(compression=compression, compression_level=1))
    payload = _payload(state)
    layout = [ShardMeta(s.key, s.dtype, s.global_shape, s.offsets, s.shape) for s in payload.shards]
    t0 = time.perf_counter()
    staging = tier.prepare(step, layout)
    records = tier.write_rank(staging, payload)
    tier.commit(step, staging, _manifest(step, records))
    return time.perf_counter() - t0


def _manifest(step: int, records: Any) -> Manifest:
    from recoverkit.format.manifest import TensorRecord

    tensors = {k: TensorRecord(k, "float32", tuple(s.shape), (s,)) for k, s in records.shards}
    return Manifest(step=step, run_id="bench", world_size=1, tensors=tensors, blobs=(records.blob,), files=records.files)


def read_back_equal(state: dict[str, torch.Tensor], url: str, step: int) -> bool:
    """Read every tensor back through the tier (CRC-verified) and compare bit for bit."""
    tier = ZarrTier(url)
    manifest = tier.manifest(step)
    ok = True
    for key, t in state.items():
        rec: ShardRecord = manifest.tensors[key].shards[0]
        buf = torch.empty(rec.nbytes, dtype=torch.uint8)
        tier.read(step, [(rec, buf)])
        ok = ok and bool(torch.equal(buf, to_bytes_view(t)))
    return ok


def run(size_mib: int, *, repeats: int, workdir: str | None = None, smoke: bool = False) -> dict[str, Any]:
    """Measure every method ``repeats`` times (interleaved) and return the result."""
    start = time.perf_counter()
    state = make_state(size_mib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    base = tempfile.mkdtemp(prefix="bench-zarr-", dir=workdir)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    disk: dict[str, int] = {}
    try:
        for rep in range(repeats):
            for m in METHODS:
                target = os.path.join(base, m)
                shutil.rmtree(target, ignore_errors=True)
                os.makedirs(target)
                if m == "plain_write_fsync":
                    times[m].append(plain_write_fsync(state, os.path.join(target, "state.bin")))
                else:
                    times[m].append(zarr_write(state, "file://" + target, COMPRESSION[m], rep + 1))
                disk[m] = tree_bytes(target)
        bit_exact = read_back_equal(state, "file://" + os.path.join(base, "zarr_raw"), repeats)
        chunks = ZarrTier("file://" + os.path.join(base, "zarr_raw")).store.read_layout(f"step-{repeats:09d}", next(iter(state))).chunks
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {m: median(v) for m, v in times.items()}
    gbps = {m: nbytes / med[m] / 1e9 for m in METHODS}
    ratios = {"raw_vs_plain": gbps["zarr_raw"] / gbps["plain_write_fsync"]}
    ratios.update({f"{m}_vs_plain": gbps[m] / gbps["plain_write_fsync"] for m in ("zarr_zstd", "zarr_blosc")})
    return {
        "scenario": "zarr_write",
        "smoke": smoke,
        "bytes": nbytes,
        "tensors": len(state),
        "chunk_shape": list(chunks),
        "repeats": repeats,
        "write_s": {m: {"median": med[m], "n": len(times[m]), "all": times[m]} for m in METHODS},
        "throughput_gbps": gbps,
        "disk_bytes": disk,
        "ratios": ratios,
        "targets": dict(TARGETS),
        "met": {k: ratios[k] >= v for k, v in TARGETS.items()},
        "bit_exact": bit_exact,
        "runtime_s": time.perf_counter() - start,
    }


def table(r: dict[str, Any]) -> str:
    """The markdown table of one result."""
    plain = r["throughput_gbps"]["plain_write_fsync"]
    lines = [
        f"tier-3 write of {fmt_bytes(r['bytes'])} in {r['tensors']} tensors (chunks {r['chunk_shape']}), "
        f"durable on return; median of {r['repeats']}",
        "",
        "| method | write (s) | GB/s | vs plain write+fsync | on disk |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in METHODS:
        g = r["throughput_gbps"][m]
        lines.append(f"| {m} | {r['write_s'][m]['median']:.3f} | {g:.2f} | {g / plain:.2f} | {fmt_bytes(r['disk_bytes'][m])} |")
    ok = "met" if r["met"]["raw_vs_plain"] else "NOT met"
    lines += [
        "",
        f"- zarr_raw / plain write+fsync: {r['ratios']['raw_vs_plain']:.2f} (target >= {TARGETS['raw_vs_plain']}: {ok})",
        f"- read back through the tier, CRC-verified, bit-exact: {r['bit_exact']}",
        f"- runtime {r['runtime_s']:.1f} s",
    ]
    return "\n".join(lines)


def _plot(r: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        names = list(METHODS)
        colors = ["tab:gray" if n == "plain_write_fsync" else "tab:blue" for n in names]
        ax.bar(names, [r["throughput_gbps"][n] for n in names], color=colors)
        ax.axhline(r["throughput_gbps"]["plain_write_fsync"] * TARGETS["raw_vs_plain"], ls="--", color="tab:red", lw=1)
        ax.set_ylabel("durable write throughput (GB/s, median)")
        ax.set_title(f"tier-3 zarr write of {r['bytes'] / 2**20:.0f} MiB (dashed: 0.8x plain)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)

    return draw


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="4 MiB, one repeat (a few seconds)")
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="directory on the disk to measure (default: the temp dir)")
    ap.add_argument("--out-dir", default=None, help="default bench/results; smoke runs write nowhere unless given")
    a = ap.parse_args(argv)
    r = run(4, repeats=1, workdir=a.workdir, smoke=True) if a.smoke else run(a.size_mib, repeats=a.repeats, workdir=a.workdir)
    text = table(r)
    print(text)
    if a.out_dir or not a.smoke:
        publish("zarr", r, text, plot=_plot(r), out_dir=a.out_dir)
    return r


if __name__ == "__main__":
    main()
