"""bench_mttr in smoke mode, one group of sources per test (each well under 30 s).

Each runs ``python -m bench.bench_mttr --smoke --cases ...`` in a subprocess: real torchrun
agents, a real SIGKILL, a real restart. Correctness figures are asserted (every restarted job
finished, steps lost 0 from memory snapshots taken every step, no shared-memory file left);
timings never are. A source whose tier kinds are not built yet must be reported as not run, with
the reason; torchft's test skips when torchft is not installed (it is an optional extra).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from tests.bench_helpers import REPO, numbers


def _run(tmp_path, cases, timeout=120):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_mttr", "--smoke", "--cases", cases, "--out-dir", str(out),
         "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads((out / "mttr.json").read_text())
    assert r["scenario"] == "mttr" and r["smoke"] is True and "cpu" in r["machine"]
    assert (out / "mttr.md").read_text().startswith("### mttr")
    assert (out / "mttr.png").stat().st_size > 0
    assert all(math.isfinite(x) for x in numbers(r))
    assert "| restored from |" in proc.stdout
    for case in cases.split(","):
        assert case in r["summary"] or case in r["not_run"], case
    assert all(x["finished"] and x["resumed_from"] is not None for x in r["runs"])
    assert r["shm_files_left"] == 0
    return r


def _memory_case(r, case):
    if case in r["not_run"]:
        assert "not registered" in r["not_run"][case], r["not_run"][case]  # built later, never a failure
        return None
    s = r["summary"][case]
    assert s["steps_lost"] == 0 and s["mttr"] > 0
    return s


@pytest.mark.slow
def test_mttr_own_shared_memory_and_local_disk(tmp_path):
    r = _run(tmp_path, "shm,shm-inplace,local")
    assert r["summary"]["local"]["steps_lost"] >= 0 and r["summary"]["local"]["mttr"] > 0
    if _memory_case(r, "shm") is not None:
        assert r["targets"]["shm_steps_lost"] == 0
        assert _memory_case(r, "shm-inplace") is not None


@pytest.mark.slow
def test_mttr_peer_replica_after_a_node_loss(tmp_path):
    r = _run(tmp_path, "replica")
    if _memory_case(r, "replica") is not None:
        assert r["gloo_p2p_gbps"] > 0 and r["targets"]["replica_steps_lost"] == 0
        # the disk tier lags the kill by design (every 5 steps, killed after 12): memory saved them
        assert r["runs"][0]["replica_held_at_kill"] == r["runs"][0]["killed_at_step"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchft") is None, reason="torchft not installed (extra 'bench')")
def test_mttr_torchft(tmp_path):
    r = _run(tmp_path, "torchft,persistent")
    assert r["not_run"] == {}, r["not_run"]
    ft = r["torchft"]["runs"][0]
    assert ft["steps_lost"] == 0 and ft["resumed_at_step"] >= ft["killed_at_step"]
    assert ft["mttr"] > 0 and ft["survivor_steps_alone"] >= 1
    assert r["summary"]["persistent"]["mttr"] > 0


@pytest.mark.parametrize("missing", ["torchft", "torchft_lighthouse"])
def test_torchft_missing_is_a_reason_not_a_failure(monkeypatch, missing):
    from bench import _torchft

    if missing == "torchft":
        monkeypatch.setattr(_torchft.importlib.util, "find_spec", lambda name: None)
    else:  # torchft itself importable (installed or not), its lighthouse command missing
        monkeypatch.setattr(_torchft.importlib.util, "find_spec", lambda name: object())
        monkeypatch.setattr(_torchft, "_lighthouse_exe", lambda: None)
    why = _torchft.available()
    assert why and missing in why
