"""bench_elastic in smoke mode: five real torchrun jobs of 4 agents, a real SIGKILL of a node.

Runs ``python -m bench.bench_elastic --smoke`` in a subprocess and checks that the output is
well formed (JSON, markdown, PNG, every number finite) and the correctness figures against the
failure-free run: ``ordered`` and checkpoint-restart (which resumes in ordered mode) are
bit-identical, ``global`` within 1e-12 relative, ``shrink`` visibly another run; every
survivor's replica agrees; the in-process modes lose no step, checkpoint-restart at least one.
Timings are never asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.bench_helpers import REPO, numbers


@pytest.mark.slow
def test_elastic_smoke_deviation_per_mode(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_elastic", "--smoke", "--out-dir", str(out), "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads((out / "elastic.json").read_text())
    assert r["scenario"] == "elastic" and r["smoke"] is True and "cpu" in r["machine"]
    assert (out / "elastic.md").read_text().startswith("### elastic")
    assert (out / "elastic.png").stat().st_size > 0
    assert all(math.isfinite(x) for x in numbers(r))
    assert "**Convergence deviation**" in proc.stdout and "**MTTR split**" in proc.stdout
    assert r["not_run"] == {}, r["not_run"]
    assert r["shm_files_left"] == 0
    s = r["summary"]
    assert set(s) == {"failure-free", "ordered", "global", "shrink", "checkpoint-restart"}
    k, steps = r["sizes"]["kill_step"], r["sizes"]["steps"]
    for mode, row in s.items():
        assert row["replicas_agree"], mode
        assert row["worlds"] == ([4] if mode == "failure-free" else [3, 4]), (mode, row["worlds"])
        assert len(r["curves"][mode]) == steps, mode
    for mode in ("ordered", "checkpoint-restart"):
        d = s[mode]["deviation"]
        assert d["bit_identical"] and d["loss_abs_max"] == 0.0 and d["final_param_rel"] == 0.0, (mode, d)
    d = s["global"]["deviation"]
    assert d["loss_rel_max"] < 1e-12 and d["final_param_rel"] < 1e-12, d
    d = s["shrink"]["deviation"]
    assert d["loss_abs_max"] > 0 and d["final_param_rel"] > 0, d
    for mode in ("ordered", "global", "shrink"):
        m = s[mode]["mttr"]
        assert m["steps_lost"] == 0 and m["detection"] is not None and m["regroup"] > 0, (mode, m)
    m = s["checkpoint-restart"]["mttr"]
    assert m["steps_lost"] == k - (k // r["sizes"]["ckpt_every"]) * r["sizes"]["ckpt_every"] and m["steps_lost"] >= 1, m
    # after the shrink, the lost rank's share is dropped only by shrink
    assert s["shrink"]["after"]["samples_per_step"] < r["sizes"]["global_batch"]
    assert s["global"]["after"]["samples_per_step"] == r["sizes"]["global_batch"]


def test_bad_modes_are_named(tmp_path):
    for modes, word in (("ordered,bogus", "bogus"), ("ordered,global", "failure-free")):
        proc = subprocess.run([sys.executable, "-m", "bench.bench_elastic", "--modes", modes, "--out-dir", str(tmp_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and word in proc.stderr, proc.stderr[-2000:]


def test_elastic_is_a_run_all_scenario():
    from bench import run_all

    assert "elastic" in run_all.SCENARIOS and run_all.module_exists("elastic")
