"""The replica tier behind a Checkpointer: tiers [shm, replica], 4 ranks on 2 simulated nodes.

``save_async`` stages each step, the shm tier copies it into the rank's shared memory and
the replica tier's thread sends it to the holder on the other node, in the background. Each
holder's replica must equal its owner's own snapshot byte for byte, every rank must know
who holds what, and a normal close must leave no shared memory behind.
"""

from __future__ import annotations

import os
import time

from tests.distributed.harness import run_world

STEPS = 5


def _state(rank: int, step: int):
    import torch

    return {"w": torch.full((4096,), float(step + 1000 * rank)), "b": torch.arange(64.0) * step, "n": step}


def _train(rank, world, root, shm_dir):
    os.environ["RECOVERKIT_NODE"] = f"node{rank // 2}"
    os.environ["RECOVERKIT_SHM_DIR"] = shm_dir
    from recoverkit import Checkpointer, CheckpointOptions
    from recoverkit.config import StagingPolicy, TierSpec
    from recoverkit.staging.replica import ReplicaTier
    from recoverkit.storage.shm import ShmStore

    tiers = [TierSpec.shm(slots=3), TierSpec.replica(k=1), TierSpec.local(every_steps=0)]
    opts = CheckpointOptions(capture_rng=False, tiers=tiers, staging=StagingPolicy(budget_bytes=16 << 20))
    with Checkpointer(root, options=opts) as ckpt:
        replica = ckpt.tiers["replica"]
        assert isinstance(replica, ReplicaTier) and replica.early
        assert replica.placement == {0: [2], 1: [3], 2: [0], 3: [1]}
        for step in range(1, STEPS + 1):
            ckpt.save_async(step, _state(rank, step))
        ckpt.wait(60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            held = replica.holdings()
            if all(held.get(o, {}).get(h) == STEPS for o, hs in replica.placement.items() for h in hs):
                break
            time.sleep(0.02)
        same = {}
        for owner in replica.owners():  # the replica here vs the owner's own snapshot on its node
            mine = ShmStore(root).slots(owner, replica=True)
            theirs = ShmStore(root, node=replica.nodes[owner]).slots(owner)
            with mine.open(STEPS) as a, theirs.open(STEPS) as b:
                same[owner] = (bytes(a.data) == bytes(b.data), a.index_bytes == b.index_bytes)
        stats = replica.stats
    return {"holdings": held, "same": same, "stats": stats, "run_id": ckpt.run_id}


def test_save_async_replicates_every_ranks_snapshot_to_the_other_node(tmp_path):
    root, shm = str(tmp_path / "ckpt"), str(tmp_path / "shm")
    out = run_world(4, _train, root, shm, timeout_s=240)
    expect = {0: {2: STEPS}, 1: {3: STEPS}, 2: {0: STEPS}, 3: {1: STEPS}}
    for rank, r in enumerate(out):
        assert r["holdings"] == expect, r  # known on every rank
        assert r["same"] == {(rank + 2) % 4: (True, True)}, r  # bit-exact, index and bytes
        assert r["stats"]["error"] is None and r["stats"]["bad_transfers"] == 0, r["stats"]
    # a normal close leaves no shared memory behind (own snapshots and replicas)
    left = [os.path.join(d, f) for d, _, fs in os.walk(shm) for f in fs]
    assert left == [], left
