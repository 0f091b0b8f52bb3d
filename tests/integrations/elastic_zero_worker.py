"""The job of test_elastic_zero.py: a replicated float64 model with a ZeRO-1 Adam on 4 nodes.

``python -m tests.integrations.elastic_zero_worker OUT ROOT VICTIM KILL_STEP PG_TIMEOUT_S MODE``
under one torchrun agent per simulated node (``RECOVERKIT_NODE`` a..d, one rank each,
``RECOVERKIT_SHM_DIR`` the shared memory of every node). The model is a plain module, the
same on every rank; :class:`~recoverkit.elastic.zero.ZeroOptimizer` partitions Adam's
moments over the ranks (two parameter groups: weights with weight decay, biases without),
each rank's slice saved as ShardedTensors. A :class:`~recoverkit.Checkpointer` with a
shared-memory tier and peer replicas (k=1, on another node) snapshots model, optimizer and
the trainer's position every ``SAVE_EVERY`` steps (``save_async``). The trainer runs mode
``MODE`` ("global": the full gradients all-reduced; "ordered": summed in micro-batch order,
bit for bit at any world size; then the optimizer's all-gather) with
``rebuild=Reshard(build, ...)``: after a lost rank the survivors rebuild model, optimizer
(partitioned over 3) and Checkpointer and restore the newest snapshot complete in memory,
the moments repartitioned, then redo the steps after it.

The rank whose launch rank is ``VICTIM`` stops inside its first micro-batch of step
``KILL_STEP`` once its snapshot of the last save is held by its replica's holder, writes
``paused`` and waits (bounded) for the test's SIGKILL of its node. Each rank appends every
completed step to ``steps-<launch rank>.jsonl``. Survivors write ``result-<launch
rank>.json``: the final parameters and the optimizer's full moments (hex), the recovery's
figures, or on a RegroupError its reason; they end with ``barrier();
destroy_process_group(); os._exit(0)`` (``exit-<launch rank>`` just before).

Before that job, the same ranks run the failure-free reference on the launch group:
:func:`train` with ``VICTIM`` -1 and no checkpointing (``reference-<launch rank>.json``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from datetime import timedelta
from typing import Any

import torch

from tests.integrations.elastic_fsdp2_worker import _finish, _wait_replica, _write

SEED = 11
NUM_SAMPLES, GLOBAL_BATCH, MICRO_BATCH = 120, 24, 2  # 5 steps an epoch, 12 micro-batches a step
STEPS = 5
SAVE_EVERY = 2  # snapshots after steps 2 and 4: a loss in step 4 (index 3) redoes two steps
PAUSE_LIMIT_S = 60.0
COLLECTIVE_TIMEOUT_S = 5.0


#: ``RECOVERKIT_ZERO_HIDDEN=H`` adds an H x H layer: a larger state for the printed figures
#: (the test's default: none)
HIDDEN = int(os.environ.get("RECOVERKIT_ZERO_HIDDEN", "0"))


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 24 and 12 rows: 6 and 3 per rank at world 4, 8 and 4 at world 3
    if HIDDEN:
        return torch.nn.Sequential(
            torch.nn.Linear(6, HIDDEN),
            torch.nn.Tanh(),
            torch.nn.Dropout(0.3),
            torch.nn.Linear(HIDDEN, HIDDEN),
            torch.nn.Tanh(),
            torch.nn.Linear(HIDDEN, 12),
        ).double()
    return torch.nn.Sequential(
        torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(24, 12)
    ).double()


def make_optimizer(model: torch.nn.Module, abort: Any = None) -> Any:
    """ZeRO-1 Adam over the current default group: weights (weight decay) and biases apart."""
    from recoverkit.elastic.zero import ZeroOptimizer

    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return ZeroOptimizer(
        [{"params": weights, "weight_decay": 0.01}, {"params": biases}],
        lr=0.02,
        timeout_s=COLLECTIVE_TIMEOUT_S,
        abort=abort,
    )


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(NUM_SAMPLES, 6, generator=g, dtype=torch.float64)
    return x, torch.sin(x.sum(1)) + 0.1 * x[:, 0] ** 2


def make_sampler() -> Any:
    from recoverkit.state.global_batch import GlobalBatchSampler

    return GlobalBatchSampler(NUM_SAMPLES, GLOBAL_BATCH, MICRO_BATCH, seed=SEED)


def loss_sum(
    model: Any, x: torch.Tensor, y: torch.Tensor, samples: tuple[int, ...]
) -> torch.Tensor:
    idx = list(samples)
    return ((model(x[idx]).mean(-1) - y[idx]) ** 2).sum()


def full_hex(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter (the same on every rank), as hex."""
    return {
        k: v.detach().contiguous().numpy().tobytes().hex() for k, v in model.state_dict().items()
    }


def moments_hex(opt: Any) -> dict[str, str]:
    """The optimizer's full moments, every group (an all-gather: every rank, same order), as hex."""
    return {
        f"{i}/{k}": v.numpy().tobytes().hex()
        for i, g in enumerate(opt.full_state())
        for k, v in g.items()
    }


def checkpoint_options(shm_dir: str) -> Any:
    from recoverkit import CheckpointOptions
    from recoverkit.config import StagingPolicy, TierSpec

    return CheckpointOptions(
        capture_rng=False,  # the random streams are keyed to the micro-batch
        commit_timeout_s=20.0,
        tiers=[
            TierSpec.shm(slots=3, shm_dir=shm_dir),
            TierSpec.replica(k=1),
            TierSpec.local(every_steps=0),
        ],
        staging=StagingPolicy(budget_bytes=max(8 << 20, 4 * 8 * (HIDDEN + 8) ** 2)),
    )


def train(
    rank: int,
    world: int,
    out: str | None = None,
    root: str | None = None,
    victim: int = -1,
    kill_step: int = -1,
    pg_timeout_s: float = 10.0,
    mode: Any = "global",
) -> dict[str, Any]:
    """Train one epoch on the default group (the trainer's ``mode``); with ``root``,
    snapshots and in-process reshard.

    Returns the final parameters (hex), the losses per step and the recoveries' figures."""
    from recoverkit import Checkpointer
    from recoverkit.distributed.regroup import Heartbeat, Membership, job_store
    from recoverkit.elastic import ElasticOptions, ElasticTrainer
    from recoverkit.elastic.reshard import Rebuilt, Reshard

    store = job_store(timeout_s=10.0)
    membership = Membership.initial(store)
    heartbeat = Heartbeat(store, membership, interval_s=0.1, miss_s=1.0).start() if root else None
    x, y = make_data()
    shm_dir = os.environ.get("RECOVERKIT_SHM_DIR", "")

    def abort() -> (
        str | None
    ):  # the optimizer's all-gather gives up when the heartbeat sees a member dead
        dead = heartbeat.dead() if heartbeat is not None else set()
        return f"launch rank(s) {sorted(dead)} stopped beating" if dead else None

    def build(m: Any) -> Rebuilt:
        model = make_model()
        opt = make_optimizer(model, abort if heartbeat is not None else None)
        assert root is not None
        return Rebuilt(model, opt, Checkpointer(root, options=checkpoint_options(shm_dir)))

    reshard: Any = None

    def loss_fn(model: Any, mb: Any) -> torch.Tensor:
        if membership.launch_rank == victim and mb.step == kill_step and out is not None:
            held = _wait_replica(reshard, victim, kill_step // SAVE_EVERY * SAVE_EVERY, 30.0)
            _write(os.path.join(out, "paused"), {"rank": rank, "replica_held": held})
            time.sleep(PAUSE_LIMIT_S)  # the test SIGKILLs this node meanwhile
            _finish(4, False)
        return loss_sum(model, x, y, mb.samples)

    if root:
        first = build(membership)
        reshard = Reshard(build, first, close_timeout_s=3.0, timeout_s=30.0)
        model, opt = first.model, first.optimizer
    else:
        model = make_model()
        opt = make_optimizer(model)
    options = ElasticOptions(
        mode=mode,
        regroup_timeout_s=2 * pg_timeout_s + 10,
        join_window_s=5.0,
        pg_timeout_s=pg_timeout_s,
        collective_timeout_s=COLLECTIVE_TIMEOUT_S,
    )
    trainer = ElasticTrainer(
        model,
        opt,
        make_sampler(),
        loss_fn,
        store=store,
        membership=membership,
        seed=SEED,
        options=options,
        heartbeat=heartbeat,
        rebuild=reshard,
    )
    losses: dict[int, str] = {}
    log_path = os.path.join(out, f"steps-{membership.launch_rank}.jsonl") if out else None
    while trainer.steps_done < STEPS:
        r = trainer.step()
        losses[r.step] = r.loss.hex()
        if log_path:
            with open(log_path, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "step": r.step,
                            "generation": trainer.membership.generation,
                            "loss": r.loss.hex(),
                            "samples": list(r.samples),
                            "world": r.world_size,
                        }
                    )
                    + "\n"
                )
        if reshard is not None and trainer.steps_done % SAVE_EVERY == 0:
            reshard.save(trainer)
    result: dict[str, Any] = {
        "launch_rank": membership.launch_rank,
        "params": full_hex(trainer.model),
        "moments": moments_hex(trainer.optimizer),
        "losses": losses,
        "steps_done": trainer.steps_done,
        "generation": trainer.membership.generation,
        "members": list(trainer.membership.members),
        "recoveries": [
            {
                "step": rec.step,
                "detected_by": rec.detected_by,
                "detected_at": rec.detected_at,
                "lost": list(rec.lost),
                "world_size": rec.world_size,
                "regroup_s": rec.regroup_s,
                "redo_s": rec.redo_s,
                "moved": list(rec.moved),
                **{
                    k: getattr(rec.reconcile, k)
                    for k in (
                        "steps_done",
                        "nbytes",
                        "seconds",
                        "step",
                        "close_s",
                        "build_s",
                        "restore_s",
                        "closed",
                        "where",
                    )
                    if hasattr(rec.reconcile, k)
                },
            }
            for rec in trainer.recoveries
        ],
    }
    if reshard is not None:
        reshard.close()
    if heartbeat is not None:
        heartbeat.stop()
    return result


def main(out: str, root: str, victim: int, kill_step: int, pg_timeout_s: float, mode: str) -> None:
    import torch.distributed as dist

    from recoverkit.errors import RegroupError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(message)s")
    node = os.environ["RECOVERKIT_NODE"]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a lost rendezvous host: report, end ourselves
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=pg_timeout_s))
    rank = dist.get_rank()
    _write(os.path.join(out, f"pid-{node}-{rank}"), os.getpid())
    # the failure-free run first, by the same 4 ranks on the launch group (no checkpointing)
    _write(
        os.path.join(out, f"reference-{rank}.json"), train(rank, dist.get_world_size(), mode=mode)
    )
    try:
        result = train(
            rank, dist.get_world_size(), out, root, victim, kill_step, pg_timeout_s, mode
        )
    except RegroupError as e:
        _write(
            os.path.join(out, f"result-{rank}.json"),
            {"launch_rank": rank, "error": e.reason, "message": str(e)[:800]},
        )
        _write(os.path.join(out, f"exit-{rank}"), 0)
        _finish(0, False)
    _write(os.path.join(out, f"result-{rank}.json"), result)
    _write(os.path.join(out, f"exit-{rank}"), 0)
    _finish(0, True)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), float(a[4]), a[5])
