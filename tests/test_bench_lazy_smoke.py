"""bench_lazy in smoke mode, so it never rots (well-formed result only, no timing assertions).

It runs in a subprocess: the benchmark starts a 1-process gloo group for torch.distributed.checkpoint,
and gloo's threads can race the interpreter's shutdown; the benchmark's ``__main__`` leaves with
``os._exit`` after tearing the group down, which a pytest process cannot do.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

from bench import bench_lazy
from tests.bench_helpers import REPO, numbers


def test_bench_lazy_smoke(tmp_path):
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_lazy", "--smoke", "--out-dir", str(out_dir), "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads((out_dir / "lazy.json").read_text())

    assert r["scenario"] == "lazy_async" and r["smoke"] is True
    assert "cpu" in r["machine"] and r["bytes"] > 0
    assert r["calibration"]["batch"] >= 1 and r["calibration"]["memcpy_s"] > 0
    assert set(r["stall_s"]) == {"recoverkit_save_async", "torch_save", "dcp_save", "dcp_async_save"}
    assert all(v["n"] >= 1 and v["median"] >= 0 for v in r["stall_s"].values())
    assert set(r["iteration_s"]) >= {"no_checkpoint", "save_async_every_step"}
    assert set(r["restore_s"]) == {"host_snapshot", "local_disk", "resharded_local_disk", "torch_load", "dcp_load"}
    assert all(v > 0 for v in r["restore_s"].values())
    assert r["restore_detail"]["resharded"]["bit_exact"] is True
    assert isinstance(r["restore_detail"]["host_snapshot_used"], bool)
    pool = r["memory"]["pool"]
    assert 0 < pool["high_water"] <= pool["budget_bytes"]
    assert set(r["ratios"]) >= set(bench_lazy.TARGETS) and set(r["met"]) == set(bench_lazy.TARGETS)
    assert r["recoverkit_skipped_saves"] == 0
    assert all(math.isfinite(x) for x in numbers(r))

    text = bench_lazy.table(r)
    assert "| recoverkit_save_async |" in text and "| dcp_async_save |" in text
    assert "| host_snapshot |" in text
    assert "| training stall per checkpoint |" in proc.stdout
    md = (out_dir / "lazy.md").read_text()
    assert md.startswith("### lazy") and "| recoverkit_save_async |" in md and "![lazy](lazy.png)" in md
    assert (out_dir / "lazy.png").stat().st_size > 0
