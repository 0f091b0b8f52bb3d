"""bench_engine, bench_limits and bench_overhead in smoke mode, so they never rot.

Each runs in a subprocess exactly as ``python -m bench.bench_NAME --smoke --out-dir DIR`` (the
overhead scenario starts gloo worlds, whose threads can race an interpreter's shutdown; the
module leaves with ``os._exit``, which a pytest process cannot do). Only the shape of the
output is checked: well-formed JSON, every number finite, the table and the plot written.
No timing assertions.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.bench_helpers import REPO, numbers


def _run(name: str, tmp_path, *extra: str, timeout: int = 120) -> tuple[dict, str, str]:
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.bench_{name}", "--smoke", "--out-dir", str(out_dir), "--workdir", str(tmp_path), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads((out_dir / f"{name}.json").read_text())
    assert "cpu" in r["machine"]
    bad = [x for x in numbers(r) if not math.isfinite(x)]
    assert not bad, bad
    md = (out_dir / f"{name}.md").read_text()
    assert md.startswith(f"### {name}") and f"![{name}]({name}.png)" in md
    png = out_dir / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out_dir)) == sorted(f"{name}.{ext}" for ext in ("json", "md", "png"))
    return r, md, proc.stdout


def test_bench_limits_smoke(tmp_path):
    from bench.bench_limits import ROWS

    r, md, stdout = _run("limits", tmp_path)
    assert r["scenario"] == "limits" and r["smoke"] is True and r["bytes"] > 0
    for key, label in ROWS:
        assert r[f"{key}_gb_per_s"] > 0
        assert f"| {label} |" in md and f"| {label} |" in stdout
    assert isinstance(r["read_cold"], bool)


def test_limits_function(tmp_path):
    from bench.bench_limits import limits

    lim = limits(1 << 20, str(tmp_path), reps=1)
    assert {"memcpy_1t_gb_per_s", "memcpy_2t_gb_per_s", "write_fsync_gb_per_s", "read_gb_per_s", "crc32c_gb_per_s"} <= set(lim)
    assert all(lim[k] > 0 for k in lim if k.endswith("_gb_per_s"))
    assert os.listdir(tmp_path) == []  # its files are removed


def test_bench_engine_smoke(tmp_path):
    from bench.bench_engine import ROWS, TARGETS

    r, md, stdout = _run("engine", tmp_path)
    assert r["scenario"] == "engine" and r["smoke"] is True
    assert {k for k, _, _ in ROWS} == set(r["gb_per_s"]) == set(r["seconds_median"])
    assert all(v > 0 for v in r["gb_per_s"].values())
    assert set(r["met"]) == set(TARGETS) and all(isinstance(v, bool) for v in r["met"].values())
    assert all(r["checks"].values()), r["checks"]  # bytes and CRCs agree (correctness, not speed)
    for _, label, _ in ROWS:
        assert f"| {label} |" in md
    assert "target >= 0.9" in stdout


@pytest.mark.slow
def test_bench_overhead_smoke(tmp_path):
    from bench.bench_overhead import METHODS

    r, md, stdout = _run("overhead", tmp_path, timeout=240)
    assert r["scenario"] == "overhead" and r["smoke"] is True
    assert {(c["world"], c["size_mib"]) for c in r["cells"]} == {(1, 8), (2, 8)}
    # the memory tiers not built yet, or torchft not installed: reported as not run, with the reason
    assert set(r["not_run"]) <= {"recoverkit_memory", "torchft"}, r["not_run"]
    for name, why in r["not_run"].items():
        assert why and f"- {name}: not run: " in md
    for c in r["cells"]:
        assert c["baseline_iteration_s"]["median"] > 0 and c["batch"] >= 1
        assert set(c["methods"]) == set(METHODS) - set(r["not_run"])
        for name, m in c["methods"].items():
            mem = m["host_memory"]
            assert mem["added_bytes"] == mem["anon_added_bytes"] + mem["shm_bytes"] >= 0, name
        assert c["shm_bytes_left_after_close"] == 0
        if c["world"] == 2 and "torchft" not in r["not_run"]:
            ft = c["torchft"]
            assert "error" not in ft, ft
            assert ft["committed_steps"] >= 3 and ft["baseline_step_s"] > 0 and ft["torchft_step_s"] > 0
        for name, m in c["methods"].items():
            assert set(m["iteration_s"]) == {str(k) for k in r["intervals"]}, name
            assert all(v > 0 for v in m["iteration_s"].values()), name
            assert m["mode"]["1"] == "measured" and m["stall_every_step_s"]["n"] >= 1
            assert m["stall_isolated_s"]["n"] >= 1
        assert c["methods"]["recoverkit"]["info"]["skipped_saves"] == "0"
    assert "| recoverkit |" in md and "| dcp_async_save |" in stdout
    assert os.listdir(tmp_path / "out") and not [p for p in os.listdir(tmp_path) if p.startswith("rk-bench-")]


def test_run_all_readme_and_missing_scenarios(tmp_path, monkeypatch):
    from bench import run_all

    results = tmp_path / "results"
    results.mkdir()
    (results / "engine.md").write_text("### engine\n\nmachine: x\n\n| a | b |\n\n![engine](engine.png)\n")
    (results / "engine.json").write_text(json.dumps({"machine": {
        "cpu": "test cpu", "cores": 2, "memory_gib": 1.0, "torch": "t", "engine": "native", "cuda": False, "when": "now"}}))
    readme = tmp_path / "README.md"
    text = run_all.build_readme(str(results), str(readme))
    assert readme.read_text() == text
    assert "make bench" in text and "python -m bench.bench_NAME" in text and "recoverkit bench NAME" in text
    assert "test cpu" in text and "![engine](results/engine.png)" in text
    # every scenario has a section, in order, whether it ran or not
    pos = [text.index(f"### {n}\n") for n in run_all.SCENARIOS]
    assert pos == sorted(pos)

    monkeypatch.setattr(run_all, "module_exists", lambda name: False)
    r = run_all.run_one("rank_failure", str(results), smoke=True, timeout_s=10)
    assert r["status"] == "missing" and "bench_rank_failure.py" in r["detail"]
