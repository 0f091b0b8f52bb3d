"""Benchmarks run in smoke mode so they never rot (no timing assertions)."""

from __future__ import annotations

from bench import bench_save


def test_bench_save_smoke(tmp_path):
    r = bench_save.run(size_mib=6, reps=1, workdir=str(tmp_path))
    assert r["bytes"] > 0
    assert set(r["seconds_median"]) >= {"recoverkit_save", "torch_save", "plain_write_fsync", "recoverkit_restore"}
    assert all(v > 0 for v in r["seconds_median"].values())
    assert "cpu" in r["machine"]
    assert "| recoverkit_save |" in bench_save.table(r)
