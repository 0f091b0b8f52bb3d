"""The training job of test_node_loss.py: 4 DDP ranks on 2 simulated nodes under torchrun.

``python -m tests.integrations.node_loss_worker ROOTS OUT TOTAL DIE_AT`` on each node's
torchrun agent (``RECOVERKIT_NODE`` names the node, ``RECOVERKIT_SHM_DIR`` the shared memory;
each node's root is ``ROOTS/host-<node>``). Tiers: shm (every step), replica (k=1, on the
other node), local disk every 5 steps. Each process restores (memory first,
automatically), then trains to TOTAL with a save_async after every step; its losses and, if
it gets there, the final parameters' digests are written to OUT (files named by rank and
pid: a restart for a membership change keeps torchrun's restart count). Gradients are
averaged in rank order by a DDP comm hook, so a resumed run sums them exactly as the
uninterrupted one did.

The first time it gets there, global rank 2 (node b) ends node b after step DIE_AT is saved
and replicated: it waits until node a holds the replicas of ranks 2 and 3 of that step, SIGKILLs
its sibling rank 3, deletes node b's shared memory and local root, and SIGKILLs itself.
torchrun restarts every worker; the job goes on from memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from datetime import timedelta


def _batch(step: int, rank: int):
    import torch

    g = torch.Generator().manual_seed(10_000 * step + rank)
    return torch.randn(16, 24, generator=g)


def _rank_ordered_mean(state, bucket):
    """A DDP comm hook that averages the gradients in rank order, element by element: the
    same bits whatever the bucket layout (DDP lays its buckets out again after the first
    step of each process, so a ring all-reduce over 4 ranks would sum the elements of a
    resumed run's first step in another order than the uninterrupted run did)."""
    import torch
    import torch.distributed as dist

    t = bucket.buffer()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    work = dist.all_gather(parts, t, async_op=True)

    def mean(fut):
        fut.value()  # a failed all-gather (a peer died) raises here, never averages garbage
        acc = parts[0].clone()
        for p in parts[1:]:
            acc += p
        return acc / len(parts)

    return work.get_future().then(mean)


def main(roots: str, out: str, total: int, die_at: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from recoverkit import Checkpointer, CheckpointNotFoundError, CheckpointOptions
    from recoverkit.config import StagingPolicy, TierSpec

    node = os.environ["RECOVERKIT_NODE"]
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    with open(os.path.join(out, f"pid-{rank}"), "w") as f:  # this rank's live process
        f.write(str(os.getpid()))
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: messages.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("recoverkit").addHandler(handler)
    logging.getLogger("recoverkit").setLevel(logging.INFO)

    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)))
    model.register_comm_hook(None, _rank_ordered_mean)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optim": opt}
    opts = CheckpointOptions(
        capture_rng=False,
        commit_timeout_s=60.0,
        tiers=[TierSpec.shm(slots=3), TierSpec.replica(k=1), TierSpec.local(every_steps=5)],
        staging=StagingPolicy(budget_bytes=16 << 20),
    )
    root = os.path.join(roots, f"host-{node}")
    ckpt = Checkpointer(root, options=opts)
    try:
        start = int(ckpt.restore(state))
    except CheckpointNotFoundError:
        start = 0
    source = next((m for m in messages if "restored step" in m), None)
    # one file per process: a restart for a membership change keeps torchrun's restart count
    log = open(os.path.join(out, f"losses-{rank}-{os.getpid()}.jsonl"), "w")
    for step in range(start + 1, total + 1):
        loss = model(_batch(step, rank)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.write(json.dumps({"step": step, "loss": loss.item().hex()}) + "\n")
        log.flush()
        ckpt.save_async(step, state)
        if step == die_at and rank == 2 and not os.path.exists(os.path.join(out, "node-b-lost")):
            _end_node_b(ckpt, roots, out, step)
    ckpt.wait()
    digests = {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest() for k, v in model.state_dict().items()}
    with open(os.path.join(out, f"final-{rank}-{os.getpid()}.json"), "w") as f:
        json.dump({"resumed": start, "source": source, "params": digests}, f)
    ckpt.close()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _end_node_b(ckpt, roots: str, out: str, step: int) -> None:
    """Rank 2: once node a holds the replicas of ranks 2 and 3 of ``step``, end node b."""
    ckpt.wait()
    replica = ckpt.tiers["replica"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        held = replica.holdings()
        if all(held.get(o, {}).get(h) == step for o in (2, 3) for h in replica.holders(o)):
            break
        time.sleep(0.02)
    with open(os.path.join(out, "pid-3")) as f:
        sibling = int(f.read())
    # freeze the sibling first: a dead worker makes the agent end this one too, which must not
    # happen before node b's memory and disk are gone and the marker is written
    os.kill(sibling, signal.SIGSTOP)
    shutil.rmtree(os.path.join(os.environ["RECOVERKIT_SHM_DIR"], "recoverkit", "b"), ignore_errors=True)
    shutil.rmtree(os.path.join(roots, "host-b"), ignore_errors=True)
    with open(os.path.join(out, "node-b-lost"), "w") as f:
        f.write(str(step))
    os.kill(sibling, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]))
