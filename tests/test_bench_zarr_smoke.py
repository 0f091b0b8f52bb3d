"""bench_zarr in smoke mode, so it never rots (well-formed result only, no timing assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from bench import bench_zarr

REPO = Path(__file__).resolve().parent.parent


def test_bench_zarr_smoke(tmp_path):
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_zarr", "--smoke", "--out-dir", str(out_dir), "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads((out_dir / "zarr.json").read_text())

    assert r["scenario"] == "zarr_write" and r["smoke"] is True
    assert "cpu" in r["machine"] and r["bytes"] == 4 << 20 and r["tensors"] == bench_zarr.TENSORS
    assert set(r["write_s"]) == set(bench_zarr.METHODS)
    assert all(v["n"] == 1 and v["median"] > 0 for v in r["write_s"].values())
    assert all(r["throughput_gbps"][m] > 0 and r["disk_bytes"][m] > 0 for m in bench_zarr.METHODS)
    assert r["disk_bytes"]["zarr_raw"] >= r["bytes"]  # raw chunks + crc32c + metadata
    assert set(r["ratios"]) >= set(bench_zarr.TARGETS) and set(r["met"]) == set(bench_zarr.TARGETS)
    assert r["bit_exact"] is True
    assert all(math.isfinite(x) for v in r["throughput_gbps"].values() for x in [v])
    assert list(tmp_path.glob("bench-zarr-*")) == []  # the work directory was cleaned up

    md = (out_dir / "zarr.md").read_text()
    assert md.startswith("### zarr") and "| zarr_raw |" in md and "| plain_write_fsync |" in md
    assert "| zarr_zstd |" in proc.stdout
    assert (out_dir / "zarr.png").stat().st_size > 0
