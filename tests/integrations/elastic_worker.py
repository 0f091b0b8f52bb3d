"""The job of test_elastic_shrink.py: a float64 MLP trained by ElasticTrainer on 4 nodes.

``python -m tests.integrations.elastic_worker OUT MODE VICTIM KILL_STEP STEPS PG_TIMEOUT_S [ddp] [second=R:WHERE]``
under one torchrun agent per simulated node (``RECOVERKIT_NODE``), one rank each. Each rank
writes ``pid-<node>-<rank>`` (its pid), trains ``STEPS`` steps with
:class:`~recoverkit.elastic.ElasticTrainer` in ``MODE`` and, after each completed step,
appends to ``steps-<launch rank>.jsonl`` the step, its loss and the samples it trained on.
The rank whose launch rank is ``VICTIM`` stops inside its first micro-batch of step
``KILL_STEP``, writes ``paused`` and waits (bounded) for the test's SIGKILL of its node; the
others wait in the step's collective until the kill resets it, then recover and finish.
Survivors write ``result-<launch rank>.json`` (final parameters as hex, the recoveries'
figures, or on a RegroupError its reason) and end with ``barrier();
destroy_process_group(); os._exit(0)`` (``exit-<launch rank>`` just before).

With ``ddp``, the trainer wraps the model in DDP (re-wrapped on the new group after the
re-forming); mode "global" registers the SUM hook with a state whose waits ask the heartbeat.

With ``second=R:WHERE`` (tests/integrations/test_elastic_second_loss.py), launch rank ``R``
is a second victim, lost while the survivors recover from the first: on that rank only, the
recovery after the re-forming stops, writes ``paused2`` and waits (bounded) for the test's
SIGKILL of its node, where ``WHERE`` says: ``reconcile`` (entering the agreement on the
completed step: the ``reconcile`` the trainer module imported, wrapped) or ``wrap`` (the
second call of the DDP ``wrap=``, on the new group, after the agreement completed).

The model, data, sampler and loss are built by the functions below, which the test process
uses for its failure-free reference.
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

SEED = 11
NUM_SAMPLES, GLOBAL_BATCH, MICRO_BATCH = 120, 24, 2  # 5 steps an epoch, 12 micro-batches a step
PAUSE_LIMIT_S = 60.0
COLLECTIVE_TIMEOUT_S = 5.0


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(24, 1)
    ).double()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.02)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(NUM_SAMPLES, 6, generator=g, dtype=torch.float64)
    return x, torch.sin(x.sum(1)) + 0.1 * x[:, 0] ** 2


def make_sampler() -> Any:
    from recoverkit.state.global_batch import GlobalBatchSampler

    return GlobalBatchSampler(NUM_SAMPLES, GLOBAL_BATCH, MICRO_BATCH, seed=SEED)


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


def _ddp(mode: str, heartbeat: Any) -> Any:
    """Builds the DDP wrapper on the current default group (mode "global": SUM, no division,
    its waits cut short when the heartbeat sees a member dead)."""
    from torch.nn.parallel import DistributedDataParallel

    from recoverkit.distributed.global_grad import SumHookState, sum_allreduce_hook

    def abort() -> str | None:
        dead = heartbeat.dead()
        return f"launch rank(s) {sorted(dead)} stopped beating" if dead else None

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        ddp = DistributedDataParallel(model)
        if mode == "global":
            ddp.register_comm_hook(SumHookState(abort=abort, timeout_s=COLLECTIVE_TIMEOUT_S), sum_allreduce_hook)
        return ddp

    return wrap


def _second_victim(out: str, rank: int, where: str, wrap: Any) -> Any:
    """Failure injection on the second victim only: its recovery stops where ``where`` says
    (module doc) until the test kills its node; returns the ``wrap=`` to use."""
    import recoverkit.elastic.trainer as trainer_module

    def pause(*_: Any, **__: Any) -> Any:
        _write(os.path.join(out, "paused2"), rank)
        time.sleep(PAUSE_LIMIT_S)  # the test SIGKILLs this node meanwhile
        _finish(4, False)

    if where == "reconcile":
        trainer_module.reconcile = pause  # type: ignore[assignment]
        return wrap
    if where != "wrap" or wrap is None:
        raise SystemExit(f"second victim: unknown stop {where!r} (or 'wrap' without ddp)")
    calls = [0]

    def paused_wrap(model: torch.nn.Module) -> torch.nn.Module:
        calls[0] += 1
        return wrap(model) if calls[0] == 1 else pause()

    return paused_wrap


def main(out: str, mode: str, victim: int, kill_step: int, steps: int, pg_timeout_s: float, ddp: bool,
         second: tuple[int, str] | None = None) -> None:
    import torch.distributed as dist

    from recoverkit.distributed.regroup import Heartbeat, Membership, job_store
    from recoverkit.elastic import ElasticOptions, ElasticTrainer
    from recoverkit.errors import RegroupError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(message)s")
    node = os.environ["RECOVERKIT_NODE"]
    # When the lost node hosts the rendezvous (node a), the surviving agents lose it too and
    # SIGTERM their workers within a few hundred ms; a real job then takes the restart path.
    # Ignored here so that the workers report what the trainer raised (they end themselves).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=pg_timeout_s))
    rank = dist.get_rank()
    _write(os.path.join(out, f"pid-{node}-{rank}"), os.getpid())
    store = job_store(timeout_s=10.0)
    membership = Membership.initial(store)
    heartbeat = Heartbeat(store, membership, interval_s=0.1, miss_s=1.0).start()
    x, y = make_data()

    def loss_fn(model: torch.nn.Module, mb: Any) -> torch.Tensor:
        if rank == victim and mb.step == kill_step:
            _write(os.path.join(out, "paused"), rank)
            time.sleep(PAUSE_LIMIT_S)  # the test SIGKILLs this node meanwhile
            _finish(4, False)
        return loss_sum(model, x, y, mb.samples)

    model = make_model()
    opt = make_optimizer(model)
    # a survivor whose collective never talks to the lost rank gives it up when the heartbeat
    # sees the loss (miss_s; the others: at the reset), in every mode (DDP: through the SUM
    # hook's state); collective_timeout_s bounds every wait of the reduction; the regroup
    # waits longer than any of them
    options = ElasticOptions(mode=mode, regroup_timeout_s=2 * pg_timeout_s, join_window_s=5.0,  # type: ignore[arg-type]
                             pg_timeout_s=pg_timeout_s, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    wrap = _ddp(mode, heartbeat) if ddp else None
    if second is not None and second[0] == rank:
        wrap = _second_victim(out, rank, second[1], wrap)
    trainer = ElasticTrainer(
        model, opt, make_sampler(), loss_fn, store=store, membership=membership, seed=SEED,
        options=options, heartbeat=heartbeat, wrap=wrap,
    )
    log_path = os.path.join(out, f"steps-{rank}.jsonl")
    result: dict[str, Any] = {"launch_rank": rank}
    try:
        for _ in range(steps):
            r = trainer.step()
            with open(log_path, "a") as f:
                f.write(json.dumps({"epoch": r.epoch, "step": r.step, "loss": r.loss.hex(), "samples": list(r.samples),
                                    "micro_batches": list(r.micro_batches), "world": r.world_size}) + "\n")
    except RegroupError as e:
        result.update(error=e.reason, message=str(e)[:500], failed_at=time.time())
        killed = _read_float(os.path.join(out, "killed"), 30.0)
        result["killed"] = killed
        _write(os.path.join(out, f"result-{rank}.json"), result)
        heartbeat.stop()
        _write(os.path.join(out, f"exit-{rank}"), 0)
        _finish(0, False)
    killed = _read_float(os.path.join(out, "killed"), 30.0)
    result.update(
        killed=killed,
        generation=trainer.membership.generation,
        members=list(trainer.membership.members),
        steps_done=trainer.steps_done,
        params=params_hex(model),
        recoveries=[
            {
                "step": rec.step, "detected_by": rec.detected_by, "detected_at": rec.detected_at,
                "lost": list(rec.lost), "world_size": rec.world_size, "regroup_s": rec.regroup_s,
                "regroup_phases_s": dict(rec.regroup_phases_s), "reconcile_s": rec.reconcile.seconds,
                "reconcile_source": rec.reconcile.source, "moved": list(rec.moved), "redo_s": rec.redo_s,
                "generation": rec.generation, "failed": rec.failed,
            }
            for rec in trainer.recoveries
        ],
        state_keys=sorted(trainer.state_dict()),
    )
    _write(os.path.join(out, f"result-{rank}.json"), result)
    heartbeat.stop()
    _write(os.path.join(out, f"exit-{rank}"), 0)
    _finish(0, True)


if __name__ == "__main__":
    a = sys.argv[1:]
    flags = a[6:]
    spec = next((f.removeprefix("second=") for f in flags if f.startswith("second=")), None)
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), float(a[5]), "ddp" in flags,
         (int(spec.split(":")[0]), spec.split(":")[1]) if spec else None)
