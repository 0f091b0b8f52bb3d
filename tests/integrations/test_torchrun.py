"""Workers restarted by torchrun --max-restarts resume by themselves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_torchrun_restart_resumes(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this interpreter")
    root = str(tmp_path / "run")
    cmd = [torchrun, "--standalone", "--nproc-per-node=1", "--max-restarts=1", "-m",
           "tests.integrations.protect_worker", root, "20", "4", "-1", "11"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    starts = [e for e in events if e["event"] == "start"]
    assert starts[0]["resumed"] is None and starts[1]["resumed"] in (4, 8)  # crashed after step 11
    assert events[-1]["event"] == "done" and events[-1]["step"] == 20
