"""A node lost under torchrun, and the job resumed from memory with no step lost.

Two torchrun agents on this machine, one per simulated node (``RECOVERKIT_NODE`` a and b),
``--nnodes 2 --nproc-per-node 2`` with a c10d rendezvous on localhost and
``--max-restarts``, run 4 DDP ranks (tests/integrations/node_loss_worker.py). Every step is
saved to shared memory and replicated to the other node; the disk gets every 5th step. After
step 7, node b's workers are SIGKILLed and its shared memory and local root deleted; torchrun
restarts every worker, and the job resumes from memory: step 7 (0 steps lost, where the disk
holds step 5), node b's ranks from node a (the replicas of ranks 2 and 3, the snapshots of
ranks 0 and 1), and ends bit-identical to a run that never stopped (every loss after the
resume, every final parameter).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.distributed.harness import free_port
from tests.integrations.test_torchrun_restart import REPO, torchrun_env

TOTAL, DIE_AT = 12, 7


def _launch(base: str, *, die_at: int, timeout_s: float = 300) -> list[subprocess.CompletedProcess]:
    """Both agents (node a hosts the rendezvous store); returns their results."""
    roots, out, shm = (os.path.join(base, n) for n in ("roots", "out", "shm"))
    for d in (roots, out, shm):
        os.makedirs(d, exist_ok=True)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    port = free_port()
    procs = []
    for node in ("a", "b"):
        cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        cmd += ["--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=node-loss", "--max-restarts=2", "--monitor-interval=0.1",
                # node a hosts the rendezvous and sorts first (global ranks 0-1), whichever
                # agent starts first on a loaded machine
                f"--rdzv-conf=is_host={int(node == 'a')}", f"--local-addr={'127.0.0.1' if node == 'a' else 'localhost'}",
                "-m", "tests.integrations.node_loss_worker", roots, out, str(TOTAL), str(die_at)]
        env = dict(torchrun_env(), RECOVERKIT_NODE=node, RECOVERKIT_SHM_DIR=shm)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            stdout, stderr = p.communicate()
            stderr += "\n(timed out)"
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


def _read(out: str) -> dict[int, dict]:
    """Per rank, its last process (the one that finished): {"losses": {step: hex}, "final": {...}}."""
    runs: dict[int, dict] = {}
    for name in sorted(os.listdir(out)):
        if not name.startswith("final-"):
            continue
        rank, pid = name[len("final-") : -len(".json")].split("-")
        assert int(rank) not in runs, f"rank {rank} finished twice"
        with open(os.path.join(out, name)) as f:
            final = json.load(f)
        with open(os.path.join(out, f"losses-{rank}-{pid}.jsonl")) as f:
            losses = {ev["step"]: ev["loss"] for ev in map(json.loads, f)}
        runs[int(rank)] = {"final": final, "losses": losses}
    return runs


@pytest.mark.slow
def test_a_lost_node_resumes_from_memory_with_no_step_lost(tmp_path):
    straight = _launch(str(tmp_path / "straight"), die_at=-1)
    assert all(r.returncode == 0 for r in straight), "\n".join(r.stderr[-3000:] for r in straight)
    lost = _launch(str(tmp_path / "lost"), die_at=DIE_AT)
    assert all(r.returncode == 0 for r in lost), "\n".join(r.stderr[-3000:] for r in lost)
    out = str(tmp_path / "lost" / "out")
    assert os.path.exists(os.path.join(out, "node-b-lost")), (sorted(os.listdir(out)), [r.stderr[-3000:] for r in lost])
    ref, run = _read(str(tmp_path / "straight" / "out")), _read(out)
    assert sorted(ref) == sorted(run) == [0, 1, 2, 3], (sorted(ref), sorted(run))
    for rank in range(4):
        final = run[rank]["final"]
        assert final["resumed"] == DIE_AT, final  # 0 steps lost (the disk holds step 5)
        assert "with memory restore" in final["source"], final["source"]
        after = run[rank]["losses"]
        assert sorted(after) == list(range(DIE_AT + 1, TOTAL + 1)), sorted(after)
        for s, loss in after.items():
            assert loss == ref[rank]["losses"][s], (rank, s)
        assert final["params"] == ref[rank]["final"]["params"], rank
    for rank in (2, 3):  # node b's memory was gone: its ranks' state came from node a
        assert "from node a via rank" in run[rank]["final"]["source"]
    assert not [f for _, _, fs in os.walk(tmp_path / "lost" / "shm") for f in fs]  # closed normally: none left
