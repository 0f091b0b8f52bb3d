"""bench_restore_memory in smoke mode, so it never rots.

Runs exactly as ``python -m bench.bench_restore_memory --smoke --out-dir DIR``; only the shape
of the output is checked (well-formed JSON, every number finite, every in-place restore was in
place and bit-exact, the table and the plot written, registered with run_all). No timing
assertions.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.bench_helpers import REPO, numbers


def test_bench_restore_memory_smoke(tmp_path):
    from bench import run_all
    from bench.bench_restore_memory import METHODS, TARGETS

    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_restore_memory", "--smoke", "--out-dir", str(out_dir),
         "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads((out_dir / "restore_memory.json").read_text())
    assert r["scenario"] == "restore_memory" and r["smoke"] is True and "cpu" in r["machine"]
    (row,) = r["sizes"]
    assert row["size_mib"] == 8 and row["state_bytes"] > 7 << 20
    ran = set(row["gb_per_s"])
    assert {"memcpy", "crc_pass", "host_in_place", "host_copy_path"} <= ran <= set(METHODS)
    assert ran | set(r["not_run"]) == set(METHODS)  # shm: measured, or said why not
    assert all(v > 0 for v in row["gb_per_s"].values())
    assert row["in_place_checked"]["host"] is True and all(row["in_place_checked"].values())
    assert "host_in_place_vs_memcpy" in r["ratios"] and set(r["ratios"]) - {"host_in_place_vs_copy_path", "shm_restarted_vs_memcpy_prefaulted"} <= set(TARGETS)
    assert r["shm_files_left"] == 0
    bad = [x for x in numbers(r) if not math.isfinite(x)]
    assert not bad, bad
    md = (out_dir / "restore_memory.md").read_text()
    assert md.startswith("### restore_memory") and "![restore_memory](restore_memory.png)" in md
    assert "| 8 MiB" in md and "host_in_place_vs_memcpy" in proc.stdout
    assert (out_dir / "restore_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out_dir)) == [f"restore_memory.{ext}" for ext in ("json", "md", "png")]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("rk-bench-")]  # its files are removed
    assert "restore_memory" in run_all.SCENARIOS and run_all.module_exists("restore_memory")
