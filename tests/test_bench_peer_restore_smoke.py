"""bench_peer_restore in smoke mode, so it never rots: both memory tiers and a lost node, the figures finite.

Runs exactly as ``python -m bench.bench_peer_restore --smoke --tier T --json FILE`` (or
``--lose-node``); timings are never asserted (shared machines are noisy), only that every
figure is there and finite, and, for the lost node, that rank 1 fetched the whole state alone.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.bench_helpers import REPO, numbers


@pytest.mark.parametrize("tier", ["host", "shm", "lose-node"])
def test_bench_peer_restore_smoke(tmp_path, tier):
    out = tmp_path / "peer.json"
    which = ["--lose-node"] if tier == "lose-node" else ["--tier", tier]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_peer_restore", "--smoke", *which, "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "RECOVERKIT_SHM_DIR": str(tmp_path / "shm")},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())
    assert all(math.isfinite(x) for x in numbers(r))
    assert "|" in proc.stdout
    if tier == "lose-node":  # one way: rank 1 fetched the whole state (its snapshots' regions)
        assert r["lose_node"] and r["fetched_bytes"] >= r["state_bytes"], r
