"""bench_checkfree in smoke mode, so the convergence benchmark never rots.

Runs ``python -m bench.bench_checkfree --smoke`` in a subprocess (a 4-stage decoder on a slice
of the standard library's sources, 24 steps, the same seeded failures for every method) and
checks the output's structure: every method ran and met the failures (an edge and an interior
one), every loss is finite, checkpoint-restart rolled back and replayed the failure-free run's
losses bit for bit, and ``--retime`` re-charges the clock of the published result. Timings and
the methods' relative speed are never asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.bench_helpers import REPO, numbers

METHODS = {"no-failure", "checkfree", "checkfree+", "checkpoint-restart", "checkpoint-restart-fixed"}


@pytest.mark.slow
def test_checkfree_smoke_every_method_runs(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.bench_checkfree", "--smoke", "--out-dir", str(out), "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads((out / "checkfree.json").read_text())
    assert r["scenario"] == "checkfree" and r["smoke"] is True and "cpu" in r["machine"]
    assert (out / "checkfree.md").read_text().startswith("### checkfree")
    assert (out / "checkfree.png").stat().st_size > 0
    assert all(math.isfinite(x) for x in numbers(r))
    assert r["corpus"]["train_bytes"] > 0 and r["corpus"]["files_valid"] > 0 and len(r["corpus"]["sha256"]) == 64
    assert list(tmp_path.glob("rk-bench-checkfree-*")) == []  # the work directory was removed
    steps = r["sizes"]["steps"]
    for rate, pr in r["per_rate"].items():
        s = pr["summary"]
        assert set(s) == METHODS and set(pr["runs"]) == METHODS, rate
        for mode, row in s.items():
            curve = pr["runs"][mode]["curve"]
            assert curve[0]["step"] == 0 and len(curve) >= steps // r["sizes"]["eval_every"], mode
            assert all(math.isfinite(p["val"]) and p["t"] >= 0 for p in curve), mode
            assert row["final_val"] is not None and row["steps"] >= steps, mode
        assert s["no-failure"]["failures"] == 0 and s["no-failure"]["iterations"] == steps
        for mode in METHODS - {"no-failure"}:
            assert s[mode]["failures"] >= 2 and s[mode]["edge_failures"] >= 1, (mode, s[mode])
        for mode in ("checkfree", "checkfree+"):
            assert s[mode]["recoveries"] >= 1 and s[mode]["restarts"] == 0, mode
            actions = " ".join(f["action"] for f in pr["runs"][mode]["failures"])
            assert "average of" in actions, actions
            assert ("copy of partner" in actions) == (mode == "checkfree+"), actions
        for mode in ("checkpoint-restart", "checkpoint-restart-fixed"):
            row = s[mode]
            assert row["restarts"] >= 1 and row["saves"] >= 1 and row["bit_identical_to_ref"], (mode, row)
            assert row["iterations"] == steps + row["lost_steps"], (mode, row)
        assert "time_vs_checkpoint-restart" in s["checkfree"]

    # the clock is charged from counts: --retime rebuilds the same figures from the published JSON
    proc = subprocess.run([sys.executable, "-m", "bench.bench_checkfree", "--retime", "--out-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((out / "checkfree.json").read_text())
    for rate, pr in again["per_rate"].items():
        assert pr["summary"] == r["per_rate"][rate]["summary"], rate


def test_bad_arguments_are_named(tmp_path):
    for args, word in ((["--modes", "checkfree,bogus"], "bogus"), (["--modes", "checkfree"], "no-failure"),
                       (["--rates", "7"], "7"), (["--retime"], "checkfree"), (["--lr-scale", "0"], "lr-scale")):
        proc = subprocess.run([sys.executable, "-m", "bench.bench_checkfree", *args, "--out-dir", str(tmp_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and word in proc.stderr, (args, proc.stderr[-2000:])


def test_checkfree_is_a_run_all_scenario():
    from bench import run_all

    assert "checkfree" in run_all.SCENARIOS and run_all.module_exists("checkfree")
