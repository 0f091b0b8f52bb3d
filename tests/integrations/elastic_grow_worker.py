"""The job of test_elastic_grow.py: elastic_worker's float64 MLP, shrunk by a SIGKILL, grown back by a joiner.

Launched ranks (one torchrun agent per simulated node, ``RECOVERKIT_NODE``)::

    python -m tests.integrations.elastic_grow_worker run OUT MODE VICTIM KILL_STEP WAITS STEPS PG_TIMEOUT_S

train as elastic_worker does (``MODE`` ending in ``-ddp``: a DDP model, re-wrapped on each
new group, the newcomer's after its state came; the rank whose launch rank is ``VICTIM`` pauses inside step
``KILL_STEP`` until the test SIGKILLs its node), and rank 0 writes ``master`` (the store's
``MASTER_ADDR``/``MASTER_PORT``). ``WAITS`` is ``step:launch_rank[,step:launch_rank]``: before
that step every member waits (bounded) until that joiner has announced itself in the store,
so that its admission comes at a known boundary (the one after: admit.py's proposal names
the next boundary).

The joiner, a plain process started by the test (not torchrun)::

    python -m tests.integrations.elastic_grow_worker join OUT MODE STEPS PG_TIMEOUT_S FATE

builds its model, connects to the store by ``master``, joins (``admit.join``), starts its
heartbeat, builds its ElasticTrainer (which receives the state) and trains to ``STEPS``.
``FATE`` holds ``die``: it SIGKILLs itself right after the group formed, before taking its
state; ``ackdie``: it acknowledges its admission and SIGKILLs itself before the group
forms; ``afterack``: it announces itself only once another joiner acknowledged its admission;
``garble``: before joining, it takes a launch rank of its own and writes a malformed
record under it (a hostile announcement the members must refuse), then joins normally.

Every process that trains writes ``steps-<launch rank>.jsonl`` and ``result-<launch
rank>.json`` (final parameters as hex, recoveries and grows with their figures) and ends with
``barrier(); destroy_process_group(); os._exit(0)``.
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

from tests.integrations import elastic_worker as W

JOIN_WAIT_S = 60.0
MISS_S = 2.0  # a loaded 2-core machine: a beat 1 s late is not a loss here


def _admit_timeout(pg_timeout_s: float) -> float:
    """The bound on the acks and on the larger group's rendezvous. Like a collective, it
    waits for processes that a loaded host can starve for seconds (every member, the joiner
    too, must call in within it): half the group's timeout, not a few seconds. A joiner that
    dies after its ack costs the members this once (the second test)."""
    return pg_timeout_s / 2


def _options(mode: str, pg_timeout_s: float) -> Any:
    from recoverkit.elastic import ElasticOptions

    return ElasticOptions(mode=mode.removesuffix("-ddp"), regroup_timeout_s=2 * pg_timeout_s, join_window_s=5.0,  # type: ignore[arg-type]
                          pg_timeout_s=pg_timeout_s, collective_timeout_s=W.COLLECTIVE_TIMEOUT_S,
                          admit_timeout_s=_admit_timeout(pg_timeout_s))


def _wrap(mode: str, heartbeat: Any) -> Any:
    """``MODE`` ending in ``-ddp``: elastic_worker's DDP wrapper (mode "global": the SUM hook)."""
    return W._ddp(mode.removesuffix("-ddp"), heartbeat) if mode.endswith("-ddp") else None


def _train(out: str, trainer: Any, model: torch.nn.Module, steps: int, before_step: Any = None) -> dict[str, Any]:
    me = trainer.membership.launch_rank
    log_path = os.path.join(out, f"steps-{me}.jsonl")
    while trainer.steps_done < steps:
        if before_step is not None:
            before_step(trainer)
        r = trainer.step()
        with open(log_path, "a") as f:
            f.write(json.dumps({"epoch": r.epoch, "step": r.step, "loss": r.loss.hex(), "samples": list(r.samples),
                                "micro_batches": list(r.micro_batches), "world": r.world_size}) + "\n")
    return {
        "launch_rank": me,
        "generation": trainer.membership.generation,
        "members": list(trainer.membership.members),
        "steps_done": trainer.steps_done,
        "params": W.params_hex(model),
        "recoveries": [{"step": rec.step, "lost": list(rec.lost), "world_size": rec.world_size,
                        "detected_by": rec.detected_by[:200], "regroup_s": rec.regroup_s} for rec in trainer.recoveries],
        "grows": [{"step": g.step, "joined": list(g.joined), "dropped": list(g.dropped), "world_size": g.world_size,
                   "generation": g.generation, "admit_s": g.admit_s, "admit_phases_s": dict(g.admit_phases_s),
                   "transfer_s": g.transfer_s, "nbytes": g.nbytes, "pieces": [list(p) for p in g.pieces],
                   "failed": g.failed}
                  for g in trainer.grows],
    }


def run(out: str, mode: str, victim: int, kill_step: int, waits: str, steps: int, pg_timeout_s: float) -> None:
    import torch.distributed as dist

    from recoverkit.distributed.regroup import Heartbeat, Membership, job_store
    from recoverkit.elastic import ElasticTrainer

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(message)s")
    node = os.environ["RECOVERKIT_NODE"]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as elastic_worker: report, do not be ended by the agent
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=pg_timeout_s))
    rank = dist.get_rank()
    W._write(os.path.join(out, f"pid-{node}-{rank}"), os.getpid())
    store = job_store(timeout_s=10.0)
    membership = Membership.initial(store)
    if rank == 0:
        W._write(os.path.join(out, "master"), {"addr": os.environ["MASTER_ADDR"], "port": os.environ["MASTER_PORT"]})
    heartbeat = Heartbeat(store, membership, interval_s=0.1, miss_s=MISS_S).start()
    x, y = W.make_data()

    def loss_fn(model: torch.nn.Module, mb: Any) -> torch.Tensor:
        if rank == victim and mb.step == kill_step:
            W._write(os.path.join(out, "paused"), rank)
            time.sleep(W.PAUSE_LIMIT_S)  # the test SIGKILLs this node meanwhile
            W._finish(4, False)
        return W.loss_sum(model, x, y, mb.samples)

    expected = dict(tuple(int(v) for v in w.split(":")) for w in waits.split(","))  # step -> launch rank

    def before_step(trainer: Any) -> None:
        if trainer.steps_done not in expected:
            return
        key = f"{membership.namespace}/joiners/{expected[trainer.steps_done]}"
        deadline = time.monotonic() + JOIN_WAIT_S
        while not store.check([key]) and time.monotonic() < deadline:
            time.sleep(0.02)

    model = W.make_model()
    trainer = ElasticTrainer(model, W.make_optimizer(model), W.make_sampler(), loss_fn, store=store,
                             membership=membership, seed=W.SEED, options=_options(mode, pg_timeout_s), heartbeat=heartbeat,
                             wrap=_wrap(mode, heartbeat))
    result = _train(out, trainer, model, steps, before_step)
    W._write(os.path.join(out, f"result-{rank}.json"), result)
    heartbeat.stop()
    W._write(os.path.join(out, f"exit-{rank}"), 0)
    W._finish(0, True)


def _ack_and_die(out: str, store: Any) -> None:
    from recoverkit.distributed.regroup import LAUNCH_RANKS, NAMESPACE

    ns = f"{NAMESPACE}/{int(store.get(f'{NAMESPACE}/epoch'))}"
    me = store.add(f"{ns}/{LAUNCH_RANKS}", 1) - 1
    store.set(f"{ns}/joiners/{me}", json.dumps({"pid": os.getpid(), "host": "here"}))
    store.wait([f"{ns}/joiners/{me}/admit"], timedelta(seconds=JOIN_WAIT_S))
    generation = json.loads(store.get(f"{ns}/joiners/{me}/admit"))["generation"]
    store.set(f"{ns}/g{generation}/grow/ack/{me}", "1")
    W._write(os.path.join(out, f"acked-{me}"), generation)
    os.kill(os.getpid(), signal.SIGKILL)


def join(out: str, mode: str, steps: int, pg_timeout_s: float, fate: str) -> None:
    from recoverkit.distributed.regroup import LAUNCH_RANKS, NAMESPACE, Heartbeat, job_store
    from recoverkit.elastic import ElasticTrainer
    from recoverkit.elastic.admit import join as join_job

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(message)s")
    torch.set_num_threads(1)
    with open(os.path.join(out, "master")) as f:
        master = json.load(f)
    os.environ.update(MASTER_ADDR=master["addr"], MASTER_PORT=str(master["port"]))
    x, y = W.make_data()
    model = W.make_model()  # built before joining: the survivors do not wait for it
    opt = W.make_optimizer(model)
    store = job_store(timeout_s=10.0)
    fates = set(fate.split("-"))
    if "garble" in fates:  # a hostile announcement: a launch rank taken, a malformed record under it
        epoch = int(store.get(f"{NAMESPACE}/epoch"))
        ns = f"{NAMESPACE}/{epoch}"
        bad = store.add(f"{ns}/{LAUNCH_RANKS}", 1) - 1
        store.set(f"{ns}/joiners/{bad}", b"\xff{not json" * 3)
    if "afterack" in fates:  # announced only once another joiner acknowledged its admission
        deadline = time.monotonic() + JOIN_WAIT_S
        while not any(n.startswith("acked-") and not n.endswith(".tmp") for n in os.listdir(out)):
            if time.monotonic() > deadline:
                raise TimeoutError("no joiner acknowledged its admission")
            time.sleep(0.01)
    started = time.time()
    if "ackdie" in fates:  # admit.join's steps up to its acknowledgement, then a SIGKILL
        _ack_and_die(out, store)
    membership = join_job(store, timeout_s=JOIN_WAIT_S + 30, form_timeout_s=_admit_timeout(pg_timeout_s), pg_timeout_s=pg_timeout_s)
    me = membership.launch_rank
    W._write(os.path.join(out, f"pid-j-{me}"), os.getpid())
    W._write(os.path.join(out, f"joined-{me}"), {"started": started, "joined": time.time(),
                                                  "phases_s": dict(membership.phases_s)})
    if "die" in fates:
        os.kill(os.getpid(), signal.SIGKILL)
    heartbeat = Heartbeat(store, membership, interval_s=0.1, miss_s=MISS_S).start()

    def loss_fn(m: torch.nn.Module, mb: Any) -> torch.Tensor:
        return W.loss_sum(m, x, y, mb.samples)

    trainer = ElasticTrainer(model, opt, W.make_sampler(), loss_fn, store=store, membership=membership, seed=W.SEED,
                             options=_options(mode, pg_timeout_s), heartbeat=heartbeat, wrap=_wrap(mode, heartbeat))
    result = _train(out, trainer, model, steps)
    W._write(os.path.join(out, f"result-{me}.json"), result)
    heartbeat.stop()
    W._write(os.path.join(out, f"exit-{me}"), 0)
    W._finish(0, True)


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "run":
        run(a[1], a[2], int(a[3]), int(a[4]), a[5], int(a[6]), float(a[7]))
    else:
        join(a[1], a[2], int(a[3]), float(a[4]), a[5])
