"""A node lost under torchrun, and the survivors of an FSDP2 job reshard in process from memory.

Four torchrun agents on this machine, one per simulated node (``RECOVERKIT_NODE`` a..d,
one rank each, ``--nnodes 3:4``, c10d rendezvous on localhost, no restarts), train a
float64 model sharded with ``fully_shard`` under :class:`~recoverkit.elastic.ElasticTrainer`
(tests/integrations/elastic_fsdp2_worker.py): mode "global", snapshots of model, optimizer
and the trainer's position after every second step in each node's shared memory, each
replicated to a rank of another node. Launch rank 2 stops inside step 4 (index 3) once its
snapshot of step 2 is replicated; the test SIGKILLs its node (agent and worker) and deletes
that node's shared memory. The lost rank's shards now exist only as a replica on another
node. The survivors detect the loss, re-form a world of 3, rebuild model, optimizer and
Checkpointer on it (``Reshard``), restore step 2 from memory resharded to 3 ranks (old
ranks 0, 1, 3 from their own shared memory, old rank 2 from its replica, each new rank
fetching the pieces that overlap its new shards), take the trainer's position from the
same snapshot and redo steps 3 and 4 with the global batch kept.

Checked against the failure-free 4-rank run of the same job (a real 4-rank FSDP2 world,
no checkpointing): every step's loss and the final parameters (full tensors) within 1e-12
relative (FSDP's reduce-scatter sums per-rank partial sums, grouped differently at world 3:
not bit-exact in general; the test prints whether they were); every sample of the epoch
trained on exactly once in the final timeline (the redone steps replace the rolled-back
ones); no survivor hangs (every wait bounded; the far-side survivor of FSDP's own
collectives is freed by the group's timeout, ``PG_TIMEOUT_S``). The figures (detection,
re-forming, close of the old Checkpointer, rebuild, restore bytes and seconds, redo) are
printed, never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from tests.distributed.harness import free_port, run_world
from tests.integrations import elastic_fsdp2_worker as W
from tests.integrations.test_elastic_shrink import _end, _kill_node_of, _pids, _steps, _wait_files
from tests.integrations.test_torchrun_restart import REPO, torchrun_env

NODES = "abcd"
VICTIM = 2
KILL_STEP = 3  # the 4th step; the newest snapshot is of step 2 (SAVE_EVERY)
PG_TIMEOUT_S = 10.0
SLACK_S = 30.0  # a loaded 2-core machine


def _reference(rank: int, world: int) -> dict:
    return W.train(rank, world)


def _launch(base: str) -> tuple[list[subprocess.Popen], str, str]:
    out, root, shm = (os.path.join(base, n) for n in ("out", "root", "shm"))
    for d in (out, root, shm):
        os.makedirs(d, exist_ok=True)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    port = free_port()
    procs = []
    for node in NODES:
        cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        cmd += ["--nnodes=3:4", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=elastic-fsdp2", "--max-restarts=0", "--monitor-interval=0.1",
                "-m", "tests.integrations.elastic_fsdp2_worker", out, root, str(VICTIM), str(KILL_STEP), str(PG_TIMEOUT_S)]
        env = dict(torchrun_env(), RECOVERKIT_NODE=node, RECOVERKIT_SHM_DIR=shm)
        log = open(os.path.join(base, f"agent-{node}.log"), "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
        if node == "a":
            time.sleep(1.0)  # its agent binds the rendezvous port first
    return procs, out, shm


def _logs(base: str) -> str:
    return "\n".join(f"--- agent {n}:\n" + open(os.path.join(base, f"agent-{n}.log")).read()[-4000:] for n in NODES)


def _rel(a: dict[str, str], b: dict[str, str]) -> float:
    va = np.concatenate([np.frombuffer(bytes.fromhex(a[k]), dtype=np.float64) for k in sorted(a)])
    vb = np.concatenate([np.frombuffer(bytes.fromhex(b[k]), dtype=np.float64) for k in sorted(b)])
    return float(np.linalg.norm(va - vb) / np.linalg.norm(vb))


def test_fsdp2_survivors_reshard_from_memory_in_process_and_match_the_failure_free_run(tmp_path):
    base = str(tmp_path)
    procs, out, shm = _launch(base)
    survivors = [r for r in range(len(NODES)) if r != VICTIM]
    try:
        _wait_files(out, ["paused"], 150, base)
        deadline = time.monotonic() + 30
        while len(_pids(out)) < len(NODES) and time.monotonic() < deadline:
            time.sleep(0.05)
        node = _pids(out)[VICTIM][0]
        _kill_node_of(procs, out, VICTIM)
        shutil.rmtree(os.path.join(shm, "recoverkit", node))  # the lost node's memory is gone with it
        with open(os.path.join(out, "killed")) as f:
            killed = float(f.read())
        _wait_files(out, [f"exit-{r}" for r in survivors], 2 * PG_TIMEOUT_S + 60 + SLACK_S, base)
        results = {}
        for r in survivors:
            with open(os.path.join(out, f"result-{r}.json")) as f:
                results[r] = json.load(f)
        with open(os.path.join(out, "paused")) as f:
            paused = json.load(f)
    finally:
        _end(procs, out)
    # the failure-free run of the same job: a real 4-rank FSDP2 world (no checkpointing)
    reference = run_world(4, _reference, timeout_s=240)
    ref_params, ref_losses = reference[0]["params"], {int(k): v for k, v in reference[0]["losses"].items()}
    assert all(r["params"] == ref_params for r in reference)

    assert paused["replica_held"], paused  # the lost rank's step 2 was on another node
    for r, res in results.items():
        assert "error" not in res, (r, res, _logs(base))
        assert res["generation"] == 1 and res["members"] == survivors and res["steps_done"] == W.STEPS, res
        assert len(res["recoveries"]) == 1, res["recoveries"]
        rec = res["recoveries"][0]
        assert rec["lost"] == [VICTIM] and rec["world_size"] == 3, rec
        assert rec["step"] == 2 and rec["steps_done"] == 2, rec  # rolled back to the snapshot of step 2
        assert rec["detected_at"] - killed < PG_TIMEOUT_S + SLACK_S, rec
        # the memory restore across a world-size change
        assert "restores step 2 saved by 4 rank(s) into a world of 3" in rec["where"], rec["where"]
    # the lost rank's part came from its replica on another node, never from the lost node
    where = " | ".join(res["recoveries"][0]["where"] for res in results.values())
    assert f"rank {VICTIM}'s snapshot from replica on node" in where and f"node {node}" not in where, where
    first = results[survivors[0]]["params"]
    assert all(res["params"] == first for res in results.values())
    rel = _rel(first, ref_params)
    losses = {int(k): v for k, v in results[survivors[0]]["losses"].items()}  # JSON keys
    loss_rel = max(abs(float.fromhex(losses[k]) - float.fromhex(ref_losses[k])) / abs(float.fromhex(ref_losses[k]))
                   for k in ref_losses)  # fmt: skip
    print(f"\nelastic FSDP2 (world 4 -> 3 at step index {KILL_STEP}, restored step 2 from memory): final parameters "
          f"{rel:.3e} relative to the failure-free 4-rank run ({'bit-exact' if first == ref_params else 'not bit-exact'}), "
          f"losses within {loss_rel:.3e}")
    for r, res in sorted(results.items()):
        rec = res["recoveries"][0]
        print(f"  launch rank {r}: detected {rec['detected_at'] - killed:.3f} s after the kill ({rec['detected_by'][:70]}); "
              f"re-formed {rec['regroup_s']:.3f} s; old Checkpointer closed {rec['close_s']:.3f} s; rebuilt {rec['build_s']:.3f} s; "
              f"restored {rec['nbytes']} bytes in {rec['restore_s']:.3f} s; redo of the first step {rec['redo_s']:.3f} s")
        print(f"    {rec['where'][:400]}")
    assert set(losses) == set(ref_losses)
    assert rel < 1e-12, rel
    assert loss_rel <= 1e-12, (losses, ref_losses)

    check_the_end(out, shm, survivors, len(NODES), VICTIM, W.STEPS, W.NUM_SAMPLES)


def check_the_end(out: str, shm: str, survivors: list[int], nodes: int, victim: int, steps: int, samples: int) -> None:
    """After a 4 -> 3 run with the victim lost inside step 2: nothing left in shared memory
    (old-world snapshots included); every sample of the epoch trained once in the final
    timeline (every step's samples from the generation that completed it last); steps 2 and
    3 redone at world 3 and step 4 run there on every survivor."""
    left = [os.path.join(d, f) for d, _, files in os.walk(shm) for f in files]
    assert left == [], left
    logs = {r: _steps(out, r) for r in range(nodes)}
    assert [s["step"] for s in logs[victim]] == [0, 1, 2], logs[victim]
    last: dict[int, int] = {}  # step -> the newest generation that completed it
    for r in logs:
        for s in logs[r]:
            last[s["step"]] = max(last.get(s["step"], -1), s["generation"])
    timeline = {k: [i for r in logs for s in logs[r] if (s["step"], s["generation"]) == (k, g) for i in s["samples"]]
                for k, g in last.items()}  # fmt: skip
    assert sorted(timeline) == list(range(steps))
    seen = sorted(i for v in timeline.values() for i in v)
    assert seen == list(range(samples)), (len(seen), len(set(seen)))
    for r in survivors:
        assert [(s["step"], s["world"]) for s in logs[r]] == [(0, 4), (1, 4), (2, 4), (2, 3), (3, 3), (4, 3)], logs[r]


def test_abandon_keeps_the_snapshots_and_releases_the_lock(tmp_path):
    """The old Checkpointer of an in-process recovery: closed without deleting its shared
    memory (the new one restores from it) and without holding the root's lock."""
    import torch

    from recoverkit import Checkpointer, CheckpointOptions
    from recoverkit.config import TierSpec

    root, shm = str(tmp_path / "root"), str(tmp_path / "shm")
    opts = CheckpointOptions(capture_rng=False, tiers=[TierSpec.shm(shm_dir=shm), TierSpec.local(every_steps=0)])
    w = torch.arange(6.0)
    old = Checkpointer(root, options=opts)
    old.save_async(3, {"w": w})  # settled by abandon: it lands in shared memory first
    assert old.abandon(timeout_s=30.0)
    target = torch.zeros(6)
    with Checkpointer(root, options=opts) as new:  # takes the lock the old one held
        assert int(new.restore({"w": target})) == 3
    assert torch.equal(target, w)


def _nothing_in_memory(rank: int, world: int, tmp: str) -> dict:
    """Survivors whose memory holds no snapshot: Reshard.recover raises RegroupError on every rank."""
    import torch

    from recoverkit import Checkpointer
    from recoverkit.distributed.regroup import Membership, job_store
    from recoverkit.elastic import ElasticTrainer
    from recoverkit.elastic.reshard import Rebuilt, Reshard
    from recoverkit.elastic.sharded import fsdp_wrap
    from recoverkit.errors import RegroupError

    os.environ["RECOVERKIT_NODE"] = "abc"[rank]
    root, shm = os.path.join(tmp, "root"), os.path.join(tmp, "shm")

    def build(m):
        model = W.shard(W.make_model())
        return Rebuilt(model, W.make_optimizer(model), Checkpointer(root, options=W.checkpoint_options(shm)))

    store = job_store(timeout_s=10.0)
    membership = Membership.initial(store)
    first = build(membership)
    reshard = Reshard(build, first, close_timeout_s=3.0, timeout_s=30.0)
    trainer = ElasticTrainer(first.model, first.optimizer, W.make_sampler(), lambda m, mb: torch.zeros(()),
                             store=store, membership=membership, seed=W.SEED, wrap=fsdp_wrap("global"), rebuild=reshard)
    start = time.monotonic()
    try:
        reshard.recover(trainer, membership)
    except RegroupError as e:
        return {"reason": e.reason, "message": str(e), "seconds": time.monotonic() - start,
                "kept": trainer.model is first.model}
    return {"reason": None}


def test_no_step_in_memory_falls_back_to_the_restart_path_on_every_rank(tmp_path):
    out = run_world(3, _nothing_in_memory, str(tmp_path), timeout_s=180)
    for o in out:
        assert o["reason"] == "restore", o
        assert "could not restore one step from memory at world 3" in o["message"], o
        assert "CheckpointNotFoundError" in o["message"] and o["kept"], o
    print("\nno snapshot in memory: RegroupError on every rank after", [round(o["seconds"], 3) for o in out], "s")


def test_the_documented_examples_run():
    import doctest
    import inspect

    from recoverkit import Checkpointer
    from recoverkit.elastic.sharded import fsdp_wrap

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for obj in (Checkpointer.abandon, fsdp_wrap):
        module = inspect.getmodule(obj)
        for t in doctest.DocTestFinder(recurse=False).find(obj, module=module, globs=dict(vars(module))):
            runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 2 and result.failed == 0
