"""bench_small_tensors in smoke mode, so it never rots.

Runs exactly as ``python -m bench.bench_small_tensors --smoke --out-dir DIR``; only the shape
of the output is checked (well-formed JSON, every number finite, the table and the plot
written, registered with run_all). No timing assertions.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.bench_helpers import REPO, numbers


def test_bench_small_tensors_smoke(tmp_path):
    from bench import run_all
    from bench.bench_small_tensors import TARGETS, TIMES

    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_small_tensors", "--smoke", "--out-dir", str(out_dir), "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads((out_dir / "small_tensors.json").read_text())
    assert r["scenario"] == "small_tensors" and r["smoke"] is True and "cpu" in r["machine"]
    assert r["count"] == 2000 and r["data_bytes"] == 2000 * 16
    assert set(r["seconds_median"]) == set(TIMES) and all(v > 0 for v in r["seconds_median"].values())
    assert set(TARGETS) <= set(r["ratios"])
    assert r["bytes"]["segment"] >= r["data_bytes"] + r["bytes"]["blob"]
    assert r["bytes"]["step_dir"] == r["bytes"]["segment"] + r["bytes"]["manifest"]
    bad = [x for x in numbers(r) if not math.isfinite(x)]
    assert not bad, bad
    md = (out_dir / "small_tensors.md").read_text()
    assert md.startswith("### small_tensors") and "![small_tensors](small_tensors.png)" in md
    assert "| recoverkit_save |" in md and "| torch_save_fsync |" in proc.stdout
    assert (out_dir / "small_tensors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out_dir)) == [f"small_tensors.{ext}" for ext in ("json", "md", "png")]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("rk-bench-")]  # its files are removed
    assert "small_tensors" in run_all.SCENARIOS and run_all.module_exists("small_tensors")
