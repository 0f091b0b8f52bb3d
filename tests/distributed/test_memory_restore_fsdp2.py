"""FSDP2 (DTensor) state restored from memory into a world of another size, resharded.

A 4-rank FSDP2 job (gloo, simulated nodes "a", "a", "b", "b") trains; step 5 is on the disk,
step 7 only in shared memory (each rank's own snapshot and a replica on the other node, real
slots of the real ShmStore, as in ``test_memory_restore``) and, for reference, on a scratch
disk root. A 3-rank FSDP2 world (nodes "a", "a", "b"; node b's memory lost) restores model
and optimizer through a CheckpointReader whose strategies are MemoryRestore then
TierFallback: step 7 from memory, every full tensor bit-exact with a restore of step 7 from
the scratch disk into the same 3-rank sharding, each rank gathering only the saved pieces
overlapping its new shards (the DTensor targets' regions).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings

import torch

from tests.distributed.harness import run_world
from tests.distributed.test_fsdp2 import _fsdp, _full, _model, _train_step
from tests.distributed.test_memory_restore import _Holder, _to_slot

OLD_NODES = ("a", "a", "b", "b")
NEW_NODES = ("a", "a", "b")


def _save(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    from recoverkit import Checkpointer, CheckpointOptions
    from recoverkit.config import TierSpec
    from recoverkit.storage.shm import ShmStore

    root, scratch, shm_dir = (os.path.join(tmp, n) for n in ("ckpt", "scratch", "shm"))
    model = _fsdp(_model())
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    opts = CheckpointOptions(capture_rng=False, tiers=[TierSpec.local(every_steps=1)])
    for step in range(1, 8):
        _train_step(model, opt, step, rank)
        if step in (5, 7):
            with Checkpointer(root if step == 5 else scratch, options=opts) as ckpt:
                ckpt.save(step, {"model": model, "optim": opt})
    _to_slot(scratch, 7, rank, ShmStore(root, shm_dir=shm_dir, node=OLD_NODES[rank]), replica=False)
    _to_slot(scratch, 7, rank, ShmStore(root, shm_dir=shm_dir, node=OLD_NODES[(rank + 2) % 4]), replica=True)
    dist.barrier()


def _restore(rank: int, world: int, tmp: str) -> dict:
    from recoverkit.distributed.coordinator import default_coordinator
    from recoverkit.reading import CheckpointReader
    from recoverkit.recovery import MemoryRestore, TierFallback
    from recoverkit.storage.local import LocalTier
    from recoverkit.storage.shm import ShmStore

    root, scratch, shm_dir = (os.path.join(tmp, n) for n in ("ckpt", "scratch", "shm"))
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: messages.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("recoverkit").addHandler(handler)
    logging.getLogger("recoverkit").setLevel(logging.INFO)
    holder = _Holder(ShmStore(root, shm_dir=shm_dir, node=NEW_NODES[rank]), default_coordinator(timeout_s=60), 60.0)
    reader = CheckpointReader(root, tiers=[LocalTier(root)], rank=rank, strategies=[MemoryRestore(holder), TierFallback()])
    model = _fsdp(_model())
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = int(reader.restore({"model": model, "optim": opt}))
    ref_model = _fsdp(_model())
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CheckpointReader(scratch, tiers=[LocalTier(scratch)], rank=rank).restore({"model": ref_model, "optim": ref_opt})
    got = {"model": _full(model.state_dict()), "optim": _full(opt.state_dict()["state"])}
    want = {"model": _full(ref_model.state_dict()), "optim": _full(ref_opt.state_dict()["state"])}
    untrained = _full(_fsdp(_model()).state_dict())
    return {
        "trained": got["model"] != untrained and bool(got["optim"]),
        "step": step,
        "same": got == want,
        "source": " | ".join(m for m in messages if "restores step" in m),
        "warnings": [str(w.message) for w in caught],
    }


def test_fsdp2_state_restores_from_memory_from_4_into_3_ranks_bit_exact(tmp_path):
    run_world(4, _save, str(tmp_path), timeout_s=300)
    shutil.rmtree(os.path.join(str(tmp_path), "shm", "recoverkit", "b"))  # node b's memory lost
    out = run_world(3, _restore, str(tmp_path), timeout_s=300)
    for r, o in enumerate(out):
        assert o["step"] == 7 and o["same"] and o["trained"], (r, o)
        assert "saved by 4 rank(s) into a world of 3" in o["source"], o
