"""torchft side by side with recoverkit: live recovery from a healthy replica group, and its per-step cost.

torchft (PyPI ``torchft``, an optional benchmark dependency: ``pip install -e '.[bench]'``) keeps
a job alive by replicating the whole training state across *replica groups*: a lost group is
relaunched and heals by receiving the state from a healthy group while that group keeps training.
This module runs it on localhost with the same model as the recoverkit scenarios
(:func:`bench._workers.small_model`, AdamW):

* a ``torchft_lighthouse`` bound to 127.0.0.1 (:class:`Lighthouse`);
* two replica groups of one process each, each under its own ``torchrun --max-restarts=1``
  (``python -m bench._torchft mttr ...``): ``torchft.Manager`` + ``ProcessGroupGloo`` +
  torchft's ``DistributedDataParallel``, the checkpoint transport ``PGTransport`` (torchft's
  example's choice) or ``HTTPTransport`` (its default);
* replica group 1 SIGKILLs itself after committing step ``die_at`` on its first attempt;
  torchrun relaunches it; it joins the quorum, receives the state, and steps again.

:func:`run_mttr` returns, per trial, the phases from the SIGKILL: **detection** (until the
surviving group commits its first step without the dead one), **relaunch** (until the new
interpreter reaches the worker module), **import** (``import torch, torchft``, the model),
**join + state transfer** (the Manager, the quorum and receiving the state: the transport's
receive is also timed alone), **first step** (until the healed group's first committed step),
and the steps lost (torchft never rolls the job back: the survivor's steps are kept; the
survivor's steps taken with half the replicas meanwhile are counted too).

:func:`run_overhead` measures torchft's per-step cost: two replica groups (two processes) train the
same model with the same per-group batch, first as plain ``torch.nn.parallel.DDP`` over a gloo
world (the baseline), then wrapped in torchft (Manager, quorum every step, torchft DDP and
optimizer wrapper); the ratio of their median step times is torchft's overhead.

Importing this module imports no torchft; :func:`available` says whether it can run.
"""

from __future__ import annotations

# ruff: noqa: E402 - the imports follow T0 on purpose
import time

T0 = time.time()  # first thing: the moment a worker's interpreter reached the module (launch time)

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import traceback
from datetime import timedelta
from typing import Any

from ._common import free_port
from ._workers import event_log, small_model
from .machine import median

__all__ = ["available", "Lighthouse", "run_mttr", "run_overhead", "TORCHFT_PHASES"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the phases of a torchft recovery, in order (seconds from the SIGKILL add up to the MTTR)
TORCHFT_PHASES = ("relaunch", "import", "join_transfer", "first_step")


def available() -> str | None:
    """None when torchft and its lighthouse can run here, else why not (for a skip line)."""
    if importlib.util.find_spec("torchft") is None:
        return "torchft is not installed (pip install -e '.[bench]')"
    if _lighthouse_exe() is None:
        return "the torchft_lighthouse command is not on PATH"
    return None


def _lighthouse_exe() -> str | None:
    return shutil.which("torchft_lighthouse", path=os.path.dirname(sys.executable)) or shutil.which("torchft_lighthouse")


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


class Lighthouse:
    """A ``torchft_lighthouse`` on 127.0.0.1 for the life of a ``with`` block.

    Args:
        min_replicas: replica groups a quorum needs (1: a lone survivor keeps training).
        heartbeat_timeout_ms: a group silent this long is dead (torchft's default is 5000).
        join_timeout_ms: how long a quorum waits for heartbeating stragglers.
        quorum_tick_ms: how often the lighthouse re-checks a pending quorum.

    Example:
        >>> with Lighthouse() as lh:  # doctest: +SKIP
        ...     env = {"TORCHFT_LIGHTHOUSE": lh.address}
    """

    def __init__(self, min_replicas: int = 1, heartbeat_timeout_ms: int = 1000, join_timeout_ms: int = 1000,
                 quorum_tick_ms: int = 50, log_path: str | None = None) -> None:
        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.settings = {"min_replicas": min_replicas, "heartbeat_timeout_ms": heartbeat_timeout_ms,
                         "join_timeout_ms": join_timeout_ms, "quorum_tick_ms": quorum_tick_ms}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Lighthouse:
        exe = _lighthouse_exe()
        if exe is None:
            raise RuntimeError("torchft_lighthouse is not installed")
        cmd = [exe, "--bind", f"127.0.0.1:{self.port}"] + [f"--{k}={v}" for k, v in self.settings.items()]
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"torchft_lighthouse exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("torchft_lighthouse did not listen within 20 s")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- the worker (one replica group)
def _timed_transport(kind: str, pg: Any, log: Any) -> Any:
    """torchft's checkpoint transport of ``kind``, its receive timed (event ``recv``)."""
    import torch

    if kind == "pg":
        from torchft.checkpointing.pg_transport import PGTransport

        base: Any = PGTransport
        args: tuple[Any, ...] = (pg,)
        kwargs: dict[str, Any] = {"timeout": timedelta(seconds=60), "device": torch.device("cpu")}
    elif kind == "http":
        from torchft.checkpointing.http_transport import HTTPTransport

        base, args, kwargs = HTTPTransport, (), {"timeout": timedelta(seconds=60), "num_chunks": 0}
    else:
        raise ValueError(f"unknown torchft transport {kind!r}")

    class Timed(base):  # type: ignore[misc, valid-type]
        def recv_checkpoint(self, *a: Any, **k: Any) -> Any:
            t = time.time()
            out = super().recv_checkpoint(*a, **k)
            log(event="recv", t_start=t, t=time.time())
            return out

    return Timed(*args, **kwargs)


def _mttr_worker(argv: list[str]) -> None:
    """python -m bench._torchft mttr EVENTS AFTER DIE_AT WIDTH BATCH TRANSPORT CAP_S

    One replica group (env ``REPLICA_GROUP_ID``, ``TORCHFT_LIGHTHOUSE``) under torchrun. Group 1
    SIGKILLs itself on torchrun's first attempt once it committed DIE_AT steps together with
    group 0; relaunched and healed, it names (in the file ``EVENTS.stop``) the step AFTER steps
    past its first committed one, where both groups stop. Every wait is bounded by CAP_S.
    """
    events, after, die_at, width, batch, transport, cap_s = argv[:7]
    after_i, die_at_i, width_i, batch_i, cap = int(after), int(die_at), int(width), int(batch), float(cap_s)
    replica = int(os.environ.get("REPLICA_GROUP_ID", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = event_log(events, replica=replica)
    log(event="launched", t=T0)
    import torch
    from torchft import DistributedDataParallel, Manager, ProcessGroupGloo

    log(event="imported", t=time.time())
    torch.set_num_threads(1)
    net, opt = small_model(width_i)
    nbytes = sum(p.numel() * 4 for p in net.parameters()) * 3

    def load_state_dict(sd: dict[str, Any]) -> None:
        t = time.time()
        net.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
        log(event="loaded", t_start=t, t=time.time())

    def state_dict() -> dict[str, Any]:
        return {"model": net.state_dict(), "optim": opt.state_dict()}

    t_enter = time.time()
    pg = ProcessGroupGloo(timeout=timedelta(seconds=10))
    manager = Manager(
        pg=pg, min_replica_size=1, load_state_dict=load_state_dict, state_dict=state_dict,
        replica_id=f"bench_rg{replica}", timeout=timedelta(seconds=30), quorum_timeout=timedelta(seconds=60),
        checkpoint_transport=_timed_transport(transport, pg, log), heartbeat_interval=timedelta(milliseconds=100),
    )
    model = DistributedDataParallel(manager, net)
    log(event="manager", t=time.time(), t_enter=t_enter, bytes=nbytes)
    deadline = time.monotonic() + cap
    stop_file = events + ".stop"  # group 1, healed, names the step both groups stop at
    stop_at: int | None = None
    n = together = 0
    while time.monotonic() < deadline:
        n += 1
        manager.start_quorum()
        opt.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(1000 * n + replica)
        loss = model(torch.randn(batch_i, width_i, generator=g)).square().mean()
        loss.backward()
        ok = manager.should_commit()
        if ok:
            opt.step()
        step, parts = manager.current_step(), manager.num_participants()
        log(event="step", t=time.time(), ok=ok, step=step, participants=parts)
        if ok and parts == 2:
            together += 1
        if ok and replica == 1 and attempt == 0 and together >= die_at_i:
            log(event="kill", t=time.time(), step=step)
            os.kill(os.getpid(), signal.SIGKILL)
        if ok and replica == 1 and attempt > 0 and stop_at is None:
            stop_at = step + after_i
            with open(stop_file + ".tmp", "w") as f:
                f.write(str(stop_at))
            os.replace(stop_file + ".tmp", stop_file)
        if stop_at is None and replica == 0 and os.path.exists(stop_file):
            with open(stop_file) as f:
                stop_at = int(f.read())
        if ok and stop_at is not None and step >= stop_at:
            log(event="done", t=time.time(), step=step)
            break
    else:
        log(event="timeout", t=time.time(), step=manager.current_step())
    manager.shutdown(wait=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------- MTTR
def _mttr_trial(base: str, i: int, width: int, batch: int, after: int, die_at: int, transport: str,
                cap_s: float) -> dict[str, Any]:
    d = os.path.join(base, f"torchft-{i}")
    os.makedirs(d)
    events = os.path.join(d, "events.jsonl")
    with Lighthouse(log_path=os.path.join(d, "lighthouse.log")) as lh:
        procs = []
        for rg in (0, 1):
            env = dict(os.environ, OMP_NUM_THREADS="1", REPLICA_GROUP_ID=str(rg), TORCHFT_LIGHTHOUSE=lh.address,
                       RUST_LOG="warn")
            env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # torchft's Manager uses torchrun's store
            cmd = _torchrun() + ["--standalone", "--nproc-per-node=1", "--max-restarts=1", "--monitor-interval=0.1",
                                 "-m", "bench._torchft", "mttr", events, str(after), str(die_at), str(width),
                                 str(batch), transport, str(cap_s)]
            out = open(os.path.join(d, f"rg{rg}.log"), "wb")
            procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT), out))
        deadline = time.monotonic() + cap_s + 120
        try:
            for p, _ in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for p, out in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)
                out.close()
    codes = [p.returncode for p, _ in procs]
    evs = [json.loads(line) for line in open(events)] if os.path.exists(events) else []
    if codes != [0, 0] or not any(e["event"] == "kill" for e in evs) or sum(e["event"] == "done" for e in evs) != 2:
        tails = []
        for rg in (0, 1):
            with open(os.path.join(d, f"rg{rg}.log"), "rb") as f:
                tails.append(f"--- replica group {rg} (exit {codes[rg]}):\n" + f.read()[-2500:].decode(errors="replace"))
        raise RuntimeError(f"torchft trial {i} failed: events {[e['event'] for e in evs][-8:]}\n" + "\n".join(tails))
    return _phases(evs)


def _phases(evs: list[dict[str, Any]]) -> dict[str, Any]:
    kill = next(e for e in evs if e["event"] == "kill")
    after = [e for e in evs if e["t"] >= kill["t"]]
    surv = [e for e in after if e["replica"] == 0 and e["event"] == "step"]
    # detection: the survivor's first committed step taken with only itself in the quorum
    alone = next(e for e in surv if e["ok"] and e["participants"] == 1)
    r1 = {e["event"]: e for e in evs if e["replica"] == 1 and e["attempt"] == 1 and e["event"] != "step"}
    back = [e for e in evs if e["replica"] == 1 and e["attempt"] == 1 and e["event"] == "step" and e["ok"]]
    first = back[0]
    recv = r1.get("recv")
    loaded = r1.get("loaded")
    bytes_ = r1["manager"]["bytes"]
    return {
        "killed_at_step": kill["step"],
        "resumed_at_step": first["step"] - 1,
        "steps_lost": 0,  # the survivor's steps are the job's: nothing is rolled back
        "survivor_steps_alone": sum(1 for e in surv if e["ok"] and e["participants"] == 1),
        "survivor_failed_steps": sum(1 for e in surv if not e["ok"]),
        "detection": alone["t"] - kill["t"],
        "relaunch": r1["launched"]["t"] - kill["t"],
        "import": r1["manager"]["t_enter"] - r1["launched"]["t"],  # + building the model
        "join_transfer": (loaded["t"] if loaded else first["t"]) - r1["manager"]["t_enter"],
        "transfer": (recv["t"] - recv["t_start"]) if recv else None,
        "apply": (loaded["t"] - loaded["t_start"]) if loaded else None,
        "first_step": first["t"] - (loaded["t"] if loaded else r1["manager"]["t"]),
        "mttr": first["t"] - kill["t"],
        "bytes": bytes_,
        "transfer_gbps": (bytes_ / (recv["t"] - recv["t_start"]) / 1e9) if recv and recv["t"] > recv["t_start"] else None,
    }


def run_mttr(width: int, *, batch: int = 16, after: int = 5, die_at: int = 20, reps: int = 1,
             transport: str = "pg", workdir: str | None = None, cap_s: float = 240.0) -> dict[str, Any]:
    """``reps`` torchft recoveries (two replica groups, one killed); per trial and the medians.

    Returns ``{"runs": [...], "summary": {phase: median, ...}, "settings": ...}``; raises
    RuntimeError naming what failed when a trial does not recover.
    """
    import tempfile

    base = tempfile.mkdtemp(prefix="rk-bench-torchft-", dir=workdir)
    try:
        runs = [_mttr_trial(base, i, width, batch, after, die_at, transport, cap_s) for i in range(reps)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    keys = ("detection", *TORCHFT_PHASES, "mttr", "steps_lost", "survivor_steps_alone", "transfer", "apply", "transfer_gbps")
    summary = {k: median([r[k] for r in runs if r[k] is not None]) if any(r[k] is not None for r in runs) else None
               for k in keys}
    return {"runs": runs, "summary": summary,
            "settings": {"transport": transport, "replica_groups": 2, "processes_per_group": 1, "batch": batch,
                         "lighthouse": Lighthouse().settings, "torchrun": "--max-restarts=1 --monitor-interval=0.1"}}


# --------------------------------------------------------------------------- per-step overhead
def _overhead_rank(rank: int, port: int, lh_addr: str, cfg: dict[str, Any], q: Any) -> None:
    """One replica group (one process) of the overhead world: plain DDP, then torchft."""
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
        os.environ.setdefault("RUST_LOG", "warn")  # torchft's manager logs every quorum at info
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=300))
        from ._lazy_model import _fwd_bwd, _model, _opt_step

        model, opt, side = _model(cfg["size_mib"])
        x = torch.randn(cfg["batch"], side, generator=torch.Generator().manual_seed(2 + rank))

        def loop(m: Any, n: int, commit: Any = None) -> list[float]:
            ts = []
            for _ in range(n):
                t = time.perf_counter()
                if commit is not None:
                    commit[0].start_quorum()
                _fwd_bwd(m, x)
                if commit is None or commit[0].should_commit():
                    _opt_step(opt)
                else:
                    opt.zero_grad(set_to_none=False)
                ts.append(time.perf_counter() - t)
            return ts

        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loop(ddp, 1)
        base_before = loop(ddp, cfg["steps"])
        del ddp  # its reducer (and its gradient hooks) go with it
        import gc

        gc.collect()
        from torchft import DistributedDataParallel, Manager, ProcessGroupGloo

        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        pg = ProcessGroupGloo(timeout=timedelta(seconds=120))
        manager = Manager(
            pg=pg, min_replica_size=2, load_state_dict=lambda sd: None,
            state_dict=lambda: {"model": model.state_dict(), "optim": opt.state_dict()},
            replica_id=f"bench_ovh{rank}", timeout=timedelta(seconds=120), rank=0, world_size=1,
            store_addr="127.0.0.1", store_port=store.port, lighthouse_addr=lh_addr, init_sync=False,
        )
        ft = DistributedDataParallel(manager, model)
        loop(ft, 2, (manager,))
        ft_times = loop(ft, cfg["steps"], (manager,))
        committed = manager.current_step()
        manager.shutdown(wait=False)
        del ft
        gc.collect()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        base_after = loop(ddp, cfg["steps"])
        q.put((rank, "ok", {"baseline_s": base_before + base_after, "torchft_s": ft_times, "committed": committed,
                            "bytes": sum(t.numel() * t.element_size() for t in model.parameters()) * 3}))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_overhead(size_mib: int, batch: int, *, steps: int = 5, timeout_s: float = 900.0) -> dict[str, Any]:
    """torchft's per-step cost in a 2-group world vs plain DDP on the same 2 processes.

    ``size_mib`` and ``batch`` as in :mod:`bench.bench_lazy` (``_model``). Returns the median
    step times, the overhead and every step time.
    """
    import queue as queue_mod

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    cfg = {"size_mib": size_mib, "batch": batch, "steps": steps}
    with Lighthouse(min_replicas=2, join_timeout_ms=60000) as lh:
        procs = [ctx.Process(target=_overhead_rank, args=(r, port, lh.address, cfg, q)) for r in (0, 1)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(results) < 2 and time.monotonic() < deadline:
                try:
                    rank, status, value = q.get(timeout=1.0)
                except queue_mod.Empty:
                    if not any(p.is_alive() for p in procs):
                        break
                    continue
                if status != "ok":
                    raise RuntimeError(f"torchft overhead rank {rank} failed:\n{value}")
                results[rank] = value
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    if len(results) < 2:
        raise RuntimeError("torchft overhead world did not finish")
    r0 = results[0]
    b, f = median(r0["baseline_s"]), median(r0["torchft_s"])
    return {"baseline_step_s": b, "torchft_step_s": f, "overhead": f / b - 1, "committed_steps": r0["committed"],
            "bytes": r0["bytes"], "batch": batch, "steps": steps, "baseline_s": r0["baseline_s"],
            "torchft_s": r0["torchft_s"]}


if __name__ == "__main__":
    if sys.argv[1:2] == ["mttr"]:
        _mttr_worker(sys.argv[2:])
    else:
        raise SystemExit(f"usage: python -m bench._torchft mttr ...; got {sys.argv[1:]!r}")
