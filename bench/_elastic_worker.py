"""The job of bench_elastic.py: a float64 MLP with dropout trained by ElasticTrainer under torchrun.

``python -m bench._elastic_worker CONFIG_JSON`` under one torchrun agent per simulated node
(``RECOVERKIT_NODE``), one rank each. The configuration (written by
:func:`bench.bench_elastic.config`) names the output directory, the sizes, the mode, the
victim (-1: none), the step it is lost at and, for the checkpoint-restart path, the phase:

* ``phase="train"``: train ``steps`` steps in ``mode`` from scratch. The rank whose launch
  rank is ``victim`` stops inside its first micro-batch of step ``kill_step`` (counted over
  epochs), writes ``paused``
  and waits (bounded) for the harness's SIGKILL of its node. With ``ckpt_every`` > 0, launch
  rank 0 saves model, optimizer and trainer position with a
  :class:`~recoverkit.Checkpointer` (one writer: the state is replicated) every
  ``ckpt_every`` completed steps, blocking, before the next step;
* ``phase="resume"``: the restarted job (a smaller world): every rank restores the newest
  checkpoint in turn (the root's lock admits one Checkpointer at a time) and trains on to
  ``steps``.

After each completed step every rank appends to ``steps-<phase>-<launch rank>.jsonl`` the
step, its loss (hex), the world size, the step's seconds and the wall-clock time it ended.
Survivors write ``result-<phase>-<launch rank>.json`` (final parameters as hex, the
recoveries' figures, or on a RegroupError its reason) and end with ``barrier();
destroy_process_group(); os._exit(0)``. Every wait is bounded.

The model, data, sampler and loss are built by the functions below from the configuration
alone, so every mode trains the same model on the same data and schedule.
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

PAUSE_LIMIT_S = 120.0
COLLECTIVE_TIMEOUT_S = 5.0


def make_model(cfg: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    f, h = int(cfg["features"]), int(cfg["hidden"])
    return torch.nn.Sequential(
        torch.nn.Linear(f, h), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(h, h), torch.nn.Tanh(),
        torch.nn.Linear(h, 1),
    ).double()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.005)


def make_data(cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(int(cfg["num_samples"]), int(cfg["features"]), generator=g, dtype=torch.float64)
    return x, torch.sin(x.sum(1)) + 0.1 * x[:, 0] ** 2


def make_sampler(cfg: dict[str, Any]) -> Any:
    from recoverkit.state.global_batch import GlobalBatchSampler

    return GlobalBatchSampler(int(cfg["num_samples"]), int(cfg["global_batch"]), int(cfg["micro_batch"]),
                              seed=int(cfg["seed"]))


def loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, samples: tuple[int, ...]) -> torch.Tensor:
    idx = list(samples)
    return ((model(x[idx]).squeeze(-1) - y[idx]) ** 2).sum()


def params_hex(model: torch.nn.Module) -> dict[str, str]:
    return {k: v.detach().contiguous().numpy().tobytes().hex() for k, v in model.state_dict().items()}


def _write(path: str, payload: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def _read_float(path: str, limit_s: float) -> float | None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                return float(f.read())
        except (FileNotFoundError, ValueError):
            time.sleep(0.02)
    return None


def _finish(code: int, group: bool) -> None:
    if group:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(cfg: dict[str, Any]) -> None:
    import torch.distributed as dist

    from recoverkit import Checkpointer
    from recoverkit.distributed.coordinator import LocalCoordinator
    from recoverkit.distributed.regroup import Heartbeat, Membership, job_store
    from recoverkit.elastic import ElasticOptions, ElasticTrainer
    from recoverkit.errors import RegroupError

    started = time.time()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(message)s")
    out, phase, mode = str(cfg["out"]), str(cfg["phase"]), str(cfg["mode"])
    victim, kill_step, steps = int(cfg["victim"]), int(cfg["kill_step"]), int(cfg["steps"])
    ckpt_every, pg_timeout_s = int(cfg["ckpt_every"]), float(cfg["pg_timeout_s"])
    node = os.environ["RECOVERKIT_NODE"]
    # a lost node that hosts the rendezvous makes the other agents SIGTERM their workers; the
    # workers report what the trainer raised instead (they end themselves, bounded)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=pg_timeout_s))
    rank = dist.get_rank()
    _write(os.path.join(out, f"pid-{phase}-{node}-{rank}"), os.getpid())
    store = job_store(timeout_s=10.0)
    membership = Membership.initial(store)
    heartbeat = Heartbeat(store, membership, interval_s=0.1, miss_s=1.0).start()
    x, y = make_data(cfg)
    grouped = time.time()

    def loss_fn(model: torch.nn.Module, mb: Any) -> torch.Tensor:
        if phase == "train" and rank == victim and trainer.steps_done == kill_step:
            _write(os.path.join(out, "paused"), rank)
            time.sleep(PAUSE_LIMIT_S)  # the harness SIGKILLs this node meanwhile
            _finish(4, False)
        return loss_sum(model, x, y, mb.samples)

    model = make_model(cfg)
    opt = make_optimizer(model)
    options = ElasticOptions(mode=mode, regroup_timeout_s=2 * pg_timeout_s, join_window_s=5.0,  # type: ignore[arg-type]
                             pg_timeout_s=pg_timeout_s, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    trainer = ElasticTrainer(model, opt, make_sampler(cfg), loss_fn, store=store, membership=membership,
                             seed=int(cfg["seed"]), options=options, heartbeat=heartbeat)
    state = {"model": model, "optimizer": opt, "trainer": trainer}
    root = os.path.join(out, "ckpt")
    result: dict[str, Any] = {"launch_rank": rank, "started": started, "grouped": grouped}
    if phase == "resume":
        t = time.time()
        for turn in range(dist.get_world_size()):
            if turn == rank:
                with Checkpointer(root, coordinator=LocalCoordinator()) as reader:
                    result["resumed_from"] = int(reader.restore(state))
            dist.barrier()
        result["restore_s"] = time.time() - t
        result["restored"] = time.time()
    ckpt = Checkpointer(root, coordinator=LocalCoordinator()) if phase == "train" and ckpt_every and rank == 0 else None
    log_path = os.path.join(out, f"steps-{phase}-{rank}.jsonl")
    saves: list[float] = []
    try:
        while trainer.steps_done < steps:
            r = trainer.step()
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": trainer.steps_done - 1, "loss": r.loss.hex(), "world": r.world_size,
                                    "seconds": r.seconds, "n": len(r.samples), "ended": time.time()}) + "\n")
            if ckpt is not None and trainer.steps_done % ckpt_every == 0:
                t = time.perf_counter()
                ckpt.save(trainer.steps_done, state)
                saves.append(time.perf_counter() - t)
    except RegroupError as e:
        result.update(error=e.reason, message=str(e)[:500], failed_at=time.time(),
                      killed=_read_float(os.path.join(out, "killed"), 30.0))
        _write(os.path.join(out, f"result-{phase}-{rank}.json"), result)
        heartbeat.stop()
        _finish(0, False)
    if ckpt is not None:
        ckpt.close()
    killed = _read_float(os.path.join(out, "killed"), 30.0) if victim >= 0 and phase == "train" else None
    result.update(
        killed=killed,
        members=list(trainer.membership.members),
        steps_done=trainer.steps_done,
        params=params_hex(model),
        save_s=saves,
        recoveries=[
            {
                "step": rec.step, "detected_by": rec.detected_by[:200], "detected_at": rec.detected_at,
                "lost": list(rec.lost), "world_size": rec.world_size, "regroup_s": rec.regroup_s,
                "regroup_phases_s": dict(rec.regroup_phases_s), "reconcile_s": rec.reconcile.seconds,
                "moved": list(rec.moved), "redo_s": rec.redo_s,
            }
            for rec in trainer.recoveries
        ],
    )
    _write(os.path.join(out, f"result-{phase}-{rank}.json"), result)
    heartbeat.stop()
    _finish(0, True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench._elastic_worker CONFIG_JSON")
    main(json.loads(sys.argv[1]))
