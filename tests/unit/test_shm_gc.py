"""``recoverkit gc ROOT``: the shared memory a dead trainer left is reported, then removed,
never while a live trainer holds the root (real processes, a real SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from recoverkit.cli.common import EXIT_LOCKED
from recoverkit.storage.shm import ShmStore
from tests.cli.helpers import cli, cli_json

TRAINER = textwrap.dedent(
    """
    import sys, torch
    from recoverkit import Checkpointer, CheckpointOptions, TierSpec
    from recoverkit.config import StagingPolicy
    opts = CheckpointOptions(tiers=[TierSpec.shm(), TierSpec.local(every_steps=2)],
                             staging=StagingPolicy(budget_bytes=16 << 20))
    ckpt = Checkpointer(sys.argv[1], options=opts)
    for step in (1, 2, 3):
        ckpt.save_async(step, {"w": torch.full((1000,), float(step))})
    ckpt.wait()
    print("saved", flush=True)
    sys.stdin.readline()  # alive, holding the run lock, until the test kills it
    """
)


def test_gc_reports_then_removes_a_dead_jobs_shared_memory(tmp_path):
    root, shm = str(tmp_path / "ckpt"), str(tmp_path / "shm")
    env = {**os.environ, "RECOVERKIT_SHM_DIR": shm, "RECOVERKIT_NODE": "node-a"}
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, root], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout is not None and trainer.stdout.readline().strip() == "saved"
        [job] = ShmStore.jobs(shm)
        assert job.node == "node-a" and job.root == root
        # a live trainer holds the root: a dry run reports, --yes refuses and removes nothing
        doc = cli_json("gc", root, "--shm-only", "--shm-dir", shm)
        assert doc["dry_run"] and [r["path"] for r in doc["shm"]] == [job.path] and doc["shm"][0]["nbytes"] > 0
        assert doc["lock"] is not None and doc["deleted"] == []
        p = cli("gc", root, "--keep-last", "1", "--shm-dir", shm, "--yes")
        assert p.returncode == EXIT_LOCKED, p.stderr
        assert ShmStore.jobs(shm) == [job]
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=60)
    assert ShmStore.jobs(shm) == [job]  # a crash keeps them (for a restart)
    p = cli("gc", root, "--shm-only", "--shm-dir", shm, "--yes")
    assert p.returncode == 0, p.stderr
    assert f"removed shared memory of node node-a: {job.path}" in p.stdout.replace("\n", "")
    assert ShmStore.jobs(shm) == [] and os.listdir(shm) == []
    assert sorted(n for n in os.listdir(root) if n.startswith("step-")) == ["step-000000002"]  # no step deleted


def test_gc_finds_shared_memory_of_a_root_without_steps(tmp_path):
    root, shm = str(tmp_path / "ckpt"), str(tmp_path / "shm")
    os.makedirs(root)
    store = ShmStore(root, shm_dir=shm, node="n1")
    w = store.slots(0).begin(1, 16)
    w.view[:] = b"x" * 16
    w.abort()  # a torn slot: still shared memory of this root
    other = ShmStore(str(tmp_path / "other"), shm_dir=shm, node="n1")
    other.slots(0).begin(1, 8).abort()
    doc = cli_json("gc", root, "--shm-only", "--shm-dir", shm, "--yes")
    assert [r["path"] for r in doc["shm_removed"]] == [store.job_dir]
    assert [j.path for j in ShmStore.jobs(shm)] == [other.job_dir]  # another root's are not touched
    other.remove_job()
    p = cli("gc", root, "--shm-only", "--shm-dir", shm)
    assert p.returncode != 0 and "not a checkpoint root" in p.stderr
    p = cli("gc", root, "--shm-only", "--keep-last", "1")
    assert p.returncode == 2 and "--shm-only deletes no step" in p.stderr
