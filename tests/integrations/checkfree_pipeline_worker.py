"""The job of test_checkfree_pipeline.py: a 4-stage byte-level model on torch.distributed.pipelining.

``python -m tests.integrations.checkfree_pipeline_worker OUT MODE KILL_STEP STEPS [VICTIM]`` on
5 processes (torchrun): 4 hold stages 0-3, one is the spare (by launch rank, or by local rank
from ``RECOVERKIT_STAGES``, e.g. ``0,1,3,spare`` on one node and ``2`` on another; a
``dyingspare`` is a spare that SIGKILLs itself as it takes a stage, writing ``dying``; a
``spare2`` is a second spare, its files named so). MODE:
``free`` (nothing fails), ``checkfree`` (no replica: a lost stage is rebuilt from its
neighbours), ``replica`` (every stage's state copied to the next stage's process each step: a
lost stage comes back exactly), ``plus`` (CheckFree+: odd micro-batches run the edge pairs
swapped, the edge stages' embedding and head copied to their partners every step; a lost edge
stage copies its partner), ``replace`` (``replica``'s copies, no spare launched: the survivors
wait for a replacement started after the loss, ``replacement_timeout_s``), ``restart``
(checkpoint-restart: 4 processes, no spare; every stage saves its module, optimizer and
pipeline position to its run of a :class:`recoverkit.elastic.StageCheckpoints` on local disk
after every step (``pipe.save()``); torchrun restarts every worker after the loss and each
rolls back to the newest step every stage committed (``pipe.resume()``), writing
``restart-<stage>.json``: when it started, imported, formed the pipeline, restored, and
completed its first step), ``rollback`` (``checkfree``'s job with stage checkpoints saved
after every odd step: a lost stage CheckFree refuses, an edge stage, rolls every stage back
in process to the newest step all committed), ``distill`` (``checkfree`` with
``distill_steps=DISTILL_STEPS``: the rebuilt stage is fitted to the pairs its neighbours
recorded; every stage process also writes ``pairs-<stage>-<step>.pt`` after each step, the
activations it holds then and would serve: ``{"step", "inputs", "outputs"}``),
``distill_gap`` (``distill``, but stage 3's process drops what it recorded after every step,
as a stage just rebuilt holds none: the fit is skipped), ``distill_1f1b`` (``distill`` under
``schedule="1f1b"``), ``distill_plus`` (``distill`` with CheckFree+ on: ``plus``'s split and
swapped odd micro-batches), ``distill_lost`` (``distill``, but stage 3's process SIGKILLs
itself the moment a rebuild asks it for its recorded inputs, writing ``asked-inputs`` (the
time) first; a process whose step or wait for a role raises writes ``failed-<role>.json``
(``{"type", "message", "time"}``) and exits 3, without the final barrier). An optional fifth
argument names the victim stage (default
``VICTIM``). The process holding the victim stage stops inside the first
micro-batch of step ``KILL_STEP`` (not in mode ``free``), writes ``paused`` and waits (bounded)
for the test's SIGKILL of its node.

Every mode runs ``lr_factor``, a warm-up on the global step, as the pipeline's
``lr_schedule``. Files are named by each process's first role (its stage, or ``spare``).
Every stage process writes, after each completed step, ``state-<stage>-<step>.pt`` (its
stage's state dict after that step) and a line of ``steps-<role>.jsonl`` (step, loss, norms,
seconds, the learning rates the step used); a replacement
writes ``rebuilt-<stage>.pt`` (the state it was rebuilt to, before redoing the step); every
process writes ``result-<role>.json`` (its recoveries) and ends with ``barrier();
destroy_process_group(); os._exit(0)`` (``exit-<role>`` just before).

The replacement, a plain process the test starts after the kill (not torchrun)::

    python -m tests.integrations.checkfree_pipeline_worker OUT join KILL_STEP STEPS [die]

reads ``master`` (launch rank 0 writes the store's address), joins the job
(``admit.join``), builds ``StagePipeline(..., stage="joiner")`` (which takes the lost stage)
and trains like the others; its files are named ``joiner``. With ``die`` it SIGKILLs itself
right after it was admitted (``admitted-<launch rank>`` written first).

The model, data and optimizer are the functions below (the test uses them for its checks).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

STARTED = time.time()  # this process, before torch is imported (restart mode's figures)

from datetime import timedelta  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

NUM_STAGES, VICTIM = 4, 2
D, LAYERS, SEQ, BATCH, MICRO = 32, 1, 16, 8, 4
PAUSE_LIMIT_S = 90.0
PG_TIMEOUT_S = 20.0
REPLACEMENT_TIMEOUT_S = 120.0  # the survivors' wait for a replacement started after the loss
DISTILL_STEPS = 16  # modes distill*: CheckFreeOptions.distill_steps
PLUS_MODES = ("plus", "distill_plus")  # CheckFree+ on


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(D)
        self.up = torch.nn.Linear(D, 2 * D)
        self.down = torch.nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Stage(torch.nn.Module):
    """Blocks named alike on every stage; the first also embeds bytes, the last also predicts them."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, D) if index == 0 else None
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        last = index == NUM_STAGES - 1
        self.head_norm = torch.nn.LayerNorm(D) if last else None
        self.head = torch.nn.Linear(D, 256) if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        if self.head is not None and self.head_norm is not None:
            x = self.head(self.head_norm(x))
        return x


def ack_s() -> float:
    """How long the survivors' regroup waits for a member that has not acknowledged it (a dead
    one never does): generous in the tests (1.0 s) so that a heartbeat thread starved on a loaded
    2-core host is not left out; RECOVERKIT_ACK_S sets it (the figures run uses the library's
    default, three beats)."""
    v = float(os.environ.get("RECOVERKIT_ACK_S", "1.0"))
    if not 0.1 < v <= 10.0:
        raise SystemExit(f"RECOVERKIT_ACK_S must be in (0.1, 10], got {v}")
    return v


def split(
    module: torch.nn.Module,
) -> tuple[torch.nn.Module | None, torch.nn.Module, torch.nn.Module | None]:
    """CheckFree+'s parts of a stage: its embedding, its blocks, its head (the same parameters)."""
    assert isinstance(module, Stage)
    head = None
    if module.head is not None and module.head_norm is not None:
        head = torch.nn.Sequential(module.head_norm, module.head)
    return module.embed, torch.nn.Sequential(*module.blocks), head


def build_stage(index: int) -> torch.nn.Module:
    torch.manual_seed(100 + index)
    return Stage(index)


def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=0.01)


def lr_factor(step: int) -> float:
    """The learning-rate schedule on the global step: a linear warm-up over the first 4 steps
    (a failure at KILL_STEP lands inside it, so a rebuilt stage must continue it, not restart it)."""
    return min(1.0, (step + 1) / 4)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(output.reshape(-1, 256), target.reshape(-1))


def _text() -> torch.Tensor:
    import sysconfig

    path = os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")
    with open(path, "rb") as f:
        data = f.read()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


_TOKENS: list[torch.Tensor] = []


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte windows of the standard library's textwrap.py: (inputs, next bytes)."""
    if not _TOKENS:
        _TOKENS.append(_text())
    tokens = _TOKENS[0]
    span = (tokens.numel() - SEQ - 1) // BATCH
    rows = [(step * 131 + j * span) % (tokens.numel() - SEQ - 1) for j in range(BATCH)]
    x = torch.stack([tokens[o : o + SEQ] for o in rows])
    y = torch.stack([tokens[o + 1 : o + SEQ + 1] for o in rows])
    return x, y


def _write(path: str, payload: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def _save(path: str, module: torch.nn.Module) -> None:
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


_gap = [False]  # mode distill_gap: stage 3's process drops its recorded pairs


class _DieWhenAsked:
    """Mode distill_lost: stage 3's activations as the pipeline holds them, but reading its
    inputs (only a neighbour's rebuild does, in ``serve_requests``) SIGKILLs this process."""

    def __init__(self, real: Any, out: str) -> None:
        self.real, self.out = real, out
        self.stage, self.step, self.outputs = real.stage, real.step, real.outputs

    @property
    def inputs(self) -> Any:
        _write(os.path.join(self.out, "asked-inputs"), time.time())
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


def _save_pairs(path: str, got: Any) -> None:
    """What this stage would serve a neighbour's rebuild now (its activations, or none)."""
    got = got.real if isinstance(got, _DieWhenAsked) else got
    payload = None if got is None else {"step": got.step, "inputs": list(got.inputs), "outputs": list(got.outputs)}
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)


def _finish(code: int, group: bool) -> None:
    if group:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _options(mode: str) -> Any:
    from recoverkit.elastic.pipeline import PipelineOptions
    from recoverkit.recovery.checkfree import CheckFreeOptions

    return PipelineOptions(
        num_stages=NUM_STAGES,
        n_microbatches=MICRO,
        replicate=mode in ("replica", "replace"),
        schedule="1f1b" if mode == "distill_1f1b" else "gpipe",
        checkfree=CheckFreeOptions(
            plus=mode in PLUS_MODES, distill_steps=DISTILL_STEPS if mode.startswith("distill") else 0
        ),
        pg_timeout_s=PG_TIMEOUT_S,
        regroup_timeout_s=40.0,
        transfer_timeout_s=30.0,
        lr_schedule=lr_factor,
        replacement_timeout_s=REPLACEMENT_TIMEOUT_S if mode == "replace" else 0.0,
        admit_timeout_s=20.0,
    )


def _pipeline(
    store: Any, membership: Any, heartbeat: Any, mode: str, role: Any, build: Any = None, out: str = ""
) -> Any:
    """The job's pipeline; with ``out`` (modes restart and rollback) its stage checkpoints
    under ``out/ckpt`` (blocking saves to local disk, committed by every stage's run)."""
    from recoverkit import CheckpointOptions, TierSpec
    from recoverkit.elastic import StageCheckpoints
    from recoverkit.elastic.pipeline import StagePipeline

    opts = CheckpointOptions(tiers=[TierSpec.local(every_steps=1)], commit_timeout_s=PG_TIMEOUT_S)
    return StagePipeline(
        build or build_stage,
        make_optimizer,
        loss_fn,
        batch,
        store=store,
        membership=membership,
        heartbeat=heartbeat,
        options=_options(mode),
        split=split if mode in PLUS_MODES else None,
        stage=role,
        checkpoints=StageCheckpoints(os.path.join(out, "ckpt"), options=opts) if out else None,
    )


def _setup(mode: str = "") -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(message)s")
    if mode != "restart":  # agents of a lost node: the workers end themselves
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # (restart: torchrun stops the other workers with SIGTERM before it restarts them all)
    torch.set_num_threads(1)


def main(out: str, mode: str, kill_step: int, steps: int, victim: int = VICTIM) -> None:
    import torch.distributed as dist

    from recoverkit.distributed.regroup import Heartbeat, Membership, job_store

    imported = time.time()
    _setup(mode)
    _gap[0] = mode == "distill_gap"
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    dist.init_process_group("gloo", timeout=timedelta(seconds=PG_TIMEOUT_S))
    rank = dist.get_rank()
    node = os.environ.get("RECOVERKIT_NODE", "single")
    _write(os.path.join(out, f"pid-{node}-{rank}"), os.getpid())
    if rank == 0:  # where a replacement started later finds the job's store
        _write(os.path.join(out, "master"), {"addr": os.environ["MASTER_ADDR"], "port": os.environ["MASTER_PORT"]})
    store = job_store(timeout_s=30.0)
    membership = Membership.initial(store)
    heartbeat = Heartbeat(store, membership, interval_s=0.1, miss_s=2.0, ack_s=ack_s()).start()
    # RECOVERKIT_STAGES: this node's roles by local rank ("0,1,3,spare"); default: by launch rank
    roles = os.environ.get("RECOVERKIT_STAGES", "")
    role: Any = "auto"
    picked = ""
    if roles:
        picked = roles.split(",")[int(os.environ.get("LOCAL_RANK", "0"))]
        role = "spare" if picked in ("spare", "spare2", "dyingspare") else int(picked)
    built = [False]

    def build(index: int) -> torch.nn.Module:
        # "dyingspare": a spare that dies as it takes a stage (after the members agreed on it)
        if picked == "dyingspare" and built[0]:
            _write(os.path.join(out, "dying"), index)
            os.kill(os.getpid(), signal.SIGKILL)
        return build_stage(index)

    saving = mode in ("restart", "rollback")
    pipe = _pipeline(store, membership, heartbeat, mode, role, build, out if saving else "")
    built[0] = True
    # files are named by first role
    name = (picked if picked in ("dyingspare", "spare2") else "spare") if pipe.stage is None else str(pipe.stage)
    _write(os.path.join(out, f"role-{node}-{rank}"), name)

    timing: dict[str, Any] | None = None
    formed = time.time()
    if saving and pipe.resume() is not None and attempt > 0:  # a fresh start: nothing committed
        timing = dict(started=STARTED, imported=imported, formed=formed, restored=time.time(),
                      resumed_at=pipe.steps_done)  # fmt: skip

    if pipe.stage == victim and mode != "free" and pipe.module is not None and attempt == 0:

        def pause(_module: Any, _args: Any) -> None:
            if pipe.steps_done == kill_step:
                _write(os.path.join(out, "paused"), rank)
                time.sleep(PAUSE_LIMIT_S)  # the test SIGKILLs this node meanwhile
                _finish(4, False)

        pipe.module.register_forward_pre_hook(pause)

    result: dict[str, Any] = {"launch_rank": rank, "node": node, "stage": pipe.stage}
    try:
        if pipe.stage is None:
            took = pipe.wait_for_role(timeout_s=240.0)
            result["took_stage"] = pipe.stage if took else None
            if took and pipe.module is not None:
                _save(os.path.join(out, f"rebuilt-{pipe.stage}.pt"), pipe.module)
        every = {"restart": 1, "rollback": 2}.get(mode, 0)
        _train(pipe, out, name, steps, result, heartbeat, every, timing, lost=mode == "distill_lost")
    except Exception as e:
        if mode != "distill_lost":
            raise
        logging.getLogger("worker").exception("%s failed", name)
        _write(os.path.join(out, f"failed-{name}.json"),
               {"type": type(e).__name__, "message": str(e), "time": time.time()})  # fmt: skip
        heartbeat.stop()
        _finish(3, False)


def join(out: str, steps: int, fate: str = "") -> None:
    """A replacement started after the loss: joins through the job's store, takes the lost
    stage; with ``fate`` ``die``, it SIGKILLs itself once admitted, before taking it."""
    from recoverkit.distributed.regroup import Heartbeat, job_store
    from recoverkit.elastic.admit import join as join_job

    _setup()
    with open(os.path.join(out, "master")) as f:
        master = json.load(f)
    os.environ.update(MASTER_ADDR=master["addr"], MASTER_PORT=str(master["port"]))
    store = job_store(timeout_s=30.0)
    membership = join_job(store, timeout_s=REPLACEMENT_TIMEOUT_S, form_timeout_s=20.0, pg_timeout_s=PG_TIMEOUT_S)
    _write(os.path.join(out, f"pid-joiner-{membership.launch_rank}"), os.getpid())
    if fate == "die":
        _write(os.path.join(out, f"admitted-{membership.launch_rank}"), membership.generation)
        os.kill(os.getpid(), signal.SIGKILL)
    heartbeat = Heartbeat(store, membership, interval_s=0.1, miss_s=2.0, ack_s=ack_s()).start()
    pipe = _pipeline(store, membership, heartbeat, "replace", "joiner")
    result: dict[str, Any] = {"launch_rank": membership.launch_rank, "node": "joiner", "stage": None,
                              "took_stage": pipe.stage}  # fmt: skip
    assert pipe.module is not None
    _save(os.path.join(out, f"rebuilt-{pipe.stage}.pt"), pipe.module)
    _train(pipe, out, "joiner", steps, result, heartbeat)


def _train(
    pipe: Any,
    out: str,
    name: str,
    steps: int,
    result: dict[str, Any],
    heartbeat: Any,
    every: int = 0,
    timing: dict[str, Any] | None = None,
    lost: bool = False,
) -> None:
    """Steps to ``steps``; with ``every`` (restart: 1, rollback: 2) a blocking save of the
    stage after each step whose count ``every`` divides minus one (every step, or the odd ones:
    a loss inside step KILL_STEP=2 then rolls back to step 1); with ``lost`` (mode
    distill_lost) stage 3's recorded pairs are held as :class:`_DieWhenAsked`."""
    log_path = os.path.join(out, f"steps-{name}.jsonl")
    while pipe.stage is not None and pipe.steps_done < steps:
        rec = pipe.step()
        assert pipe.module is not None and pipe.optimizer is not None
        if every and pipe.steps_done % every == 1 % every:
            pipe.save()
        if timing is not None and "first_step" not in timing:  # the first step after the restore, saved
            timing["first_step"] = time.time()
            _write(os.path.join(out, f"restart-{pipe.stage}.json"), timing)
        _save(os.path.join(out, f"state-{pipe.stage}-{rec.step}.pt"), pipe.module)
        if pipe.options.checkfree.distill_steps:
            if name == "3" and _gap[0]:
                pipe.activations = None  # as a stage just rebuilt: it holds no pairs
            if name == "3" and lost and pipe.activations is not None:  # dies when asked for them
                pipe.activations = _DieWhenAsked(pipe.activations, out)
            _save_pairs(os.path.join(out, f"pairs-{pipe.stage}-{rec.step}.pt"), pipe.activations)
        with open(log_path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "step": rec.step,
                        "stage": pipe.stage,
                        "loss": rec.loss,
                        "norm": rec.norm,
                        "norms": list(rec.norms),
                        "seconds": rec.seconds,
                        "lr": [g["lr"] for g in pipe.optimizer.param_groups],
                    }
                )
                + "\n"
            )
    if pipe.stage == NUM_STAGES - 1:
        pipe.finish()
    # the test writes ``killed`` just after its SIGKILL; a process that recovered may get
    # here first on a loaded host: wait for it (bounded), as figures() needs it
    result["killed"] = None
    deadline = time.monotonic() + (30.0 if pipe.recoveries else 0.0)
    while True:
        try:
            with open(os.path.join(out, "killed")) as f:
                result["killed"] = float(f.read())
            break
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
    result["steps_done"] = pipe.steps_done
    result["recoveries"] = [
        {
            "step": r.step,
            "lost": list(r.lost_stages),
            "replaced_by": {str(k): v for k, v in r.replaced_by.items()},
            "detected_at": r.detected_at,
            "detected_by": r.detected_by,
            "regroup_s": r.regroup_s,
            "rebuild_s": r.rebuild_s,
            "total_s": r.total_s,
            "strategy": r.strategy,
            "source": r.source,
            "served": list(r.served),
            "rolled_back_to": r.rolled_back_to,
        }
        for r in pipe.recoveries
    ]
    result["lr"] = (
        [g["lr"] for g in pipe.optimizer.param_groups] if pipe.optimizer is not None else None
    )
    _write(os.path.join(out, f"result-{name}.json"), result)
    heartbeat.stop()
    if pipe.checkpoints is not None:
        pipe.checkpoints.close()
    _write(os.path.join(out, f"exit-{name}"), 0)
    _finish(0, True)


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[1] == "join":
        join(a[0], int(a[3]), *a[4:5])
    else:
        main(a[0], a[1], int(a[2]), int(a[3]), *(int(v) for v in a[4:5]))
