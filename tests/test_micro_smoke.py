"""The pytest-benchmark micro-benchmarks in bench/micro, run once each so they never rot.

``testpaths`` keeps bench/micro out of the default collection; here they run in a subprocess
with ``--benchmark-disable`` (each benchmarked function is called once, no timing, nothing
saved or compared). ``make bench-micro`` runs them for real against bench/baselines.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_micro_benchmarks_run_once(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/micro", "-q", "--benchmark-disable", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'micro'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(f for f in os.listdir(os.path.join(REPO, "bench", "micro")) if f.startswith("test_micro_"))
    assert {"test_micro_engine.py", "test_micro_segment.py", "test_micro_format.py"} <= set(files)
    assert " passed" in proc.stdout and " failed" not in proc.stdout and "error" not in proc.stdout.lower()
