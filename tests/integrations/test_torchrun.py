"""Workers restarted by torchrun --max-restarts resume by themselves.

Every torchrun here runs with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (see the README, "torchrun").
"""

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
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    starts = [e for e in events if e["event"] == "start"]
    assert starts[0]["resumed"] is None and starts[1]["resumed"] in (4, 8)  # crashed after step 11
    assert events[-1]["event"] == "done" and events[-1]["step"] == 20


def test_every_torchrun_we_launch_keeps_the_store_per_attempt():
    """Each test or benchmark that launches torchrun sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.

    Without it, gloo's init_process_group on a restart fails or hangs in about half of the runs
    (the agent's store, shared with the workers, keeps the dead attempt's keys).
    """
    launchers = []
    for top in ("tests", "bench"):
        for dirpath, _dirs, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                if 'which("torchrun"' in text or '"torch.distributed.run"' in text:
                    launchers.append(os.path.relpath(path, REPO))
                    # set here, or through the one helper that sets it (torchrun_env), or
                    # removed on purpose (torchft's Manager lives in torchrun's shared store)
                    assert (
                        'TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"' in text
                        or "torchrun_env()" in text
                        or 'env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE"' in text
                    ), path
    assert len(launchers) >= 3, launchers  # this file, the 2-rank restart tests, the MTTR benchmark
