"""A lost node, restored from memory: 4 ranks of DDP on 2 simulated nodes, every tier real.

Nodes are named by RECOVERKIT_NODE (ranks 0, 1 on "a"; 2, 3 on "b"), each with its own
node-local root; shared memory lives under a per-test RECOVERKIT_SHM_DIR. The tiers are
[shm (3 slots), replica (k=1, placed on the other node), local every 5 steps]. A first
world trains steps 1..7 with save_async and waits until every replica of step 7 is held,
then dies without closing (a crash: shared memory stays). Between the worlds the test
breaks things as a node loss does; a second world (the relaunch: a new Checkpointer on
each node's root) restores, and every rank compares with the same training replayed.

* node b lost (its shared memory and its local root deleted): every rank restores step 7
  from memory, ranks 2 and 3 from node a (the replicas of 2 and 3, the snapshots of 0, 1);
* a byte of rank 2's own snapshot flipped: detected, its replica on node a used instead;
* node b's memory lost and the replica of rank 2's step 7 on node a corrupted: detected, no
  valid copy of rank 2's step 7 anywhere, so every rank restores the newest older step node a
  holds whole (6 when the replica thread sent it, else 5: whole in memory and as new as the
  disk), with a warning naming the replica;
* both copies of rank 2 gone (node b's memory, and node a's replicas): step 5 from the disk,
  with a warning naming rank 2.

The last two use one root shared by both nodes (a restore from disk in a data-parallel job
needs every owner's segment file, which node-local disks split between the nodes).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings

import pytest
import torch

from tests.distributed.harness import run_world

NODES = ("a", "a", "b", "b")
STEPS = 7


def _env(rank: int, shm: str) -> None:
    os.environ["RECOVERKIT_NODE"] = NODES[rank]
    os.environ["RECOVERKIT_SHM_DIR"] = shm


def _root(base: str, rank: int) -> str:
    """Node-local roots (``host-a``, ``host-b``), or one shared root when ``base`` has one."""
    shared = os.path.join(base, "shared")
    return shared if os.path.isdir(shared) else os.path.join(base, f"host-{NODES[rank]}")


def _options():
    from recoverkit import CheckpointOptions
    from recoverkit.config import StagingPolicy, TierSpec

    return CheckpointOptions(
        capture_rng=False,
        commit_timeout_s=60.0,
        tiers=[TierSpec.shm(slots=3), TierSpec.replica(k=1), TierSpec.local(every_steps=5)],
        staging=StagingPolicy(budget_bytes=32 << 20),
    )


def _make():
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8)))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _train(model, opt, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(1000 * step + rank)
    opt.zero_grad()
    model(torch.randn(8, 48, generator=g)).square().mean().backward()
    opt.step()


def _tensors(state) -> dict:
    out = {f"m/{k}": v.detach().clone() for k, v in state["model"].state_dict().items()}
    for i, s in state["optim"].state_dict()["state"].items():
        out.update({f"o/{i}/{k}": v.detach().clone() for k, v in s.items()})
    out["mine"] = state["mine"]["x"].clone()
    return out


def _first(rank: int, world: int, base: str, shm: str, shared: bool) -> dict:
    """Train and save steps 1..7, wait for every replica of step 7, then die without closing."""
    _env(rank, shm)
    from recoverkit import Checkpointer

    if shared:
        os.makedirs(os.path.join(base, "shared"), exist_ok=True)
    model, opt = _make()
    state = {"model": model, "optim": opt, "mine": {"x": torch.zeros(64)}}
    ckpt = Checkpointer(_root(base, rank), options=_options())
    for step in range(1, STEPS + 1):
        _train(model, opt, rank, step)
        state["mine"] = {"x": torch.full((64,), float(100 * rank + step))}
        ckpt.save_async(step, state)
    ckpt.wait()
    replica = ckpt.tiers["replica"]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        held = replica.holdings()
        if all(held.get(o, {}).get(h) == STEPS for o, hs in replica.placement.items() for h in hs):
            break
        time.sleep(0.05)
    out = {"holdings": replica.holdings(), "shm": ckpt.tiers["shm"].slots.steps(), "disk": ckpt.tiers["local"].steps(),
           # step 7 as this rank holds it, for a restore into another world (numpy: a tensor
           # would cross the queue in shared memory this process may not outlive)
           "state": {k: v.numpy().copy() for k, v in _tensors(state).items()}}
    replica.close()  # its thread and group end; what it holds stays in shared memory
    return out  # the Checkpointer is never closed: a crash leaves the shared memory


def _relaunch(rank: int, world: int, base: str, shm: str) -> dict:
    _env(rank, shm)
    from recoverkit import Checkpointer

    ref_model, ref_opt = _make()  # the uninterrupted run, replayed (DDP: together)
    expected = {}
    for step in range(1, STEPS + 1):
        _train(ref_model, ref_opt, rank, step)
        if step >= 5:
            expected[step] = _tensors({"model": ref_model, "optim": ref_opt,
                                       "mine": {"x": torch.full((64,), float(100 * rank + step))}})
    model, opt = _make()
    state = {"model": model, "optim": opt, "mine": {"x": torch.zeros(64)}}
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: messages.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("recoverkit").addHandler(handler)
    logging.getLogger("recoverkit").setLevel(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Checkpointer(_root(base, rank), options=_options()) as ckpt:
            try:
                step = int(ckpt.restore(state))
            except Exception as e:
                raise AssertionError(f"{e}; warnings: {[str(w.message) for w in caught]}; log: {messages}") from e
            got = _tensors(state)
    want = expected.get(step, {})
    return {
        "step": step,
        "diff": sorted(k for k in want if k not in got or not torch.equal(got[k], want[k])) if want else ["?"],
        "source": next((m for m in messages if "restored step" in m), None),
        "warnings": [str(w.message) for w in caught],
    }


def _relaunch_resized(rank: int, world: int, base: str, shm: str, saved: list) -> dict:
    """A relaunch in a world of another size (nodes "a", "a", "b" for 3 ranks): every rank
    restores with a new Checkpointer; the replicated state must be step 7's, the rank-local
    one this rank's own (rank 0's for a rank the first world had not)."""
    _env(rank, shm)
    from recoverkit import Checkpointer

    model, opt = _make()
    state = {"model": model, "optim": opt, "mine": {"x": torch.zeros(64)}}
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: messages.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("recoverkit").addHandler(handler)
    logging.getLogger("recoverkit").setLevel(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Checkpointer(_root(base, rank), options=_options()) as ckpt:
            try:
                step = int(ckpt.restore(state))
            except Exception as e:
                raise AssertionError(f"{e}; warnings: {[str(w.message) for w in caught]}; log: {messages}") from e
            got = _tensors(state)
    want = dict(saved[rank if rank < len(saved) else 0])
    return {
        "step": step,
        "diff": sorted(k for k in want if k not in got or not torch.equal(got[k], want[k])),
        "source": " | ".join(m for m in messages if "restores step" in m or "restored step" in m),
        "warnings": [str(w.message) for w in caught],
    }


def _flip(base: str, shm: str, node: str, owner: int, *, replica: bool) -> None:
    """Flip a byte of a replicated tensor in ``owner``'s slot of step 7 on ``node``."""
    from recoverkit.storage.shm import ShmStore

    root = _root(base, NODES.index(node))
    slots = ShmStore(root, shm_dir=shm, node=node).slots(owner, replica=replica)
    with slots.open(STEPS) as v:
        shard = max((s for k, s in v.index.shards if not k.startswith("rank-")), key=lambda s: s.nbytes)
        path, offset = v.path, shard.offset + shard.nbytes // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _newest_whole_on_a(base: str, shm: str, *, below: int) -> int:
    """The newest step below ``below`` whose every owner's copy node a holds (its ranks' own
    snapshots, the replicas of node b's ranks), else 5 (the disk): whether the replica thread
    sent step 6 or a newer step superseded it depends on the machine's load."""
    from recoverkit.storage.shm import ShmStore

    store = ShmStore(_root(base, 0), shm_dir=shm, node="a")
    held = [set(store.slots(o, replica=NODES[o] != "a").steps()) for o in range(len(NODES))]
    return max([s for s in set.intersection(*held) if 5 <= s < below], default=5)


def _lose_memory(shm: str, node: str) -> None:
    shutil.rmtree(os.path.join(shm, "recoverkit", node))


def _crash(src, shared: bool):
    base, shm = str(src / "roots"), str(src / "shm")
    first = run_world(4, _first, base, shm, shared, timeout_s=300)
    holder = {0: 2, 1: 3, 2: 0, 3: 1}
    for r in first:
        assert r["holdings"] == {o: {h: STEPS} for o, h in holder.items()}, r
        assert STEPS in r["shm"] and r["disk"] == [5], r
    torch.save([{k: torch.from_numpy(v) for k, v in r["state"].items()} for r in first], src / "saved.pt")
    return src


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A crashed job with node-local roots, copied for each test (training it again would
    take longer)."""
    return _crash(tmp_path_factory.mktemp("crashed"), False)


@pytest.fixture(scope="module")
def crashed_shared(tmp_path_factory):
    """The same with one root every node shares (so the disk restores every rank's part)."""
    return _crash(tmp_path_factory.mktemp("crashed_shared"), True)


def _copy(crashed, tmp_path) -> tuple[str, str]:
    """The crashed job under ``tmp_path``; its shared-memory job dirs renamed for the new
    roots (a job dir is named after its root's path)."""
    from recoverkit.storage.shm import job_key

    shutil.copytree(crashed, tmp_path / "w", symlinks=True)
    base, shm = str(tmp_path / "w" / "roots"), str(tmp_path / "w" / "shm")
    for node, rank in (("a", 0), ("b", 2)):
        old = job_key(_root(os.path.join(str(crashed), "roots"), rank))
        new = job_key(_root(base, rank))
        os.rename(os.path.join(shm, "recoverkit", node, old), os.path.join(shm, "recoverkit", node, new))
    return base, shm


def test_a_lost_node_is_restored_from_memory_with_no_step_lost(crashed, tmp_path):
    base, shm = _copy(crashed, tmp_path)
    _lose_memory(shm, "b")
    shutil.rmtree(os.path.join(base, "host-b"))  # and its local disk
    out = run_world(4, _relaunch, base, shm, timeout_s=300)
    for r, o in enumerate(out):
        assert o["step"] == STEPS and o["diff"] == [], (r, o)
        assert "with memory restore" in o["source"], o["source"]
    assert "rank 2's snapshot from node a via rank 0" in out[2]["source"]  # its replica's holder
    assert "rank 0's snapshot from node a via rank" in out[3]["source"]


def test_a_lost_node_is_restored_from_memory_into_a_smaller_world(crashed, tmp_path):
    """4 -> 3 with node b's memory and disk gone: ranks 0 and 1 on node a, the new rank 2 on
    node b, which has nothing: every rank restores step 7 from memory (the old ranks 2 and
    3 from their replicas on node a), the DDP state bit-exact, each rank its own local state."""
    base, shm = _copy(crashed, tmp_path)
    _lose_memory(shm, "b")
    shutil.rmtree(os.path.join(base, "host-b"))
    saved = torch.load(tmp_path / "w" / "saved.pt")
    out = run_world(3, _relaunch_resized, base, shm, saved, timeout_s=300)
    for r, o in enumerate(out):
        assert o["step"] == STEPS and o["diff"] == [], (r, o)
        assert "saved by 4 rank(s) into a world of 3" in o["source"] and "with memory restore" in o["source"], o
    assert "rank 3's snapshot from node a via rank" in out[2]["source"], out[2]["source"]


def test_a_corrupted_snapshot_is_detected_and_its_replica_used(crashed, tmp_path):
    base, shm = _copy(crashed, tmp_path)
    _flip(base, shm, "b", 2, replica=False)
    out = run_world(4, _relaunch, base, shm, timeout_s=300)
    for o in out:
        assert o["step"] == STEPS and o["diff"] == [], o
        assert "with memory restore" in o["source"]
    assert "rank 2's snapshot from node a via rank 0" in out[2]["source"]
    assert any("rank 2's snapshot from own shm on node b" in w and "crc" in w for w in out[2]["warnings"])


def test_a_corrupted_last_replica_falls_back_to_an_older_step(crashed_shared, tmp_path):
    base, shm = _copy(crashed_shared, tmp_path)
    _lose_memory(shm, "b")
    want = _newest_whole_on_a(base, shm, below=STEPS)
    _flip(base, shm, "a", 2, replica=True)
    out = run_world(4, _relaunch, base, shm, timeout_s=300)
    for o in out:  # the newest older step node a holds whole, else step 5 (the disk: as new)
        assert o["step"] == want and o["diff"] == [], (want, o)
    assert any("replica on node a" in w and "crc" in w for w in out[2]["warnings"]), out[2]["warnings"]


def test_both_copies_of_a_rank_gone_fall_back_to_disk_naming_it(crashed_shared, tmp_path):
    base, shm = _copy(crashed_shared, tmp_path)
    _lose_memory(shm, "b")
    shutil.rmtree(os.path.join(shm, "recoverkit", "a", os.listdir(os.path.join(shm, "recoverkit", "a"))[0], "replica-00002"))
    out = run_world(4, _relaunch, base, shm, timeout_s=300)
    for o in out:
        assert o["step"] == 5 and o["diff"] == [], o
        assert "with tier fallback" in o["source"]
        assert any("step 7" in w and "[2]" in w for w in o["warnings"]), o["warnings"]
