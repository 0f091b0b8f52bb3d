"""Benchmarks run in smoke mode so they never rot (no timing assertions)."""

from __future__ import annotations

import json
import math

from bench import bench_save


def test_bench_save_smoke(tmp_path):
    r = bench_save.run(size_mib=6, reps=1, workdir=str(tmp_path))
    assert r["bytes"] > 0
    assert set(r["seconds_median"]) >= {"recoverkit_save", "torch_save", "plain_write_fsync", "recoverkit_restore"}
    assert all(v > 0 for v in r["seconds_median"].values())
    assert "cpu" in r["machine"]
    assert "| recoverkit_save |" in bench_save.table(r)


def test_bench_save_main_publishes(tmp_path, capsys):
    out = tmp_path / "out"
    r = bench_save.main(["--smoke", "--out-dir", str(out), "--workdir", str(tmp_path)])
    assert r["smoke"] is True
    assert "| recoverkit_save |" in capsys.readouterr().out
    data = json.loads((out / "save.json").read_text())
    assert data["scenario"] == "save_restore" and "cpu" in data["machine"]
    assert all(math.isfinite(v) and v > 0 for v in data["gb_per_s"].values())
    md = (out / "save.md").read_text()
    assert md.startswith("### save") and "| recoverkit_save |" in md and "![save](save.png)" in md
    assert (out / "save.png").stat().st_size > 0


def test_bench_save_smoke_writes_nothing_by_default(tmp_path, monkeypatch):
    from bench import report

    calls = []
    monkeypatch.setattr(bench_save, "publish", lambda *a, **k: calls.append(a))
    bench_save.main(["--smoke", "--workdir", str(tmp_path)])
    assert calls == []
    assert report.RESULTS_DIR.endswith("results")
