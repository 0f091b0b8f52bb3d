"""Shared pieces of the failure-injection benchmarks: a small model, state digests, forked children.

The failure scenarios kill real processes many times. Starting a fresh interpreter per trial costs
~1.6 s of ``import torch`` on this class of machine, so most scenarios run a *fork server*: the
benchmark process imports torch and recoverkit once, never runs a torch op itself (so no OpenMP or
engine threads exist when it forks), and ``fork()``s one child per life of the training job. A child
reports to the parent through a pipe, one short line per event (writes below ``PIPE_BUF`` are
atomic, so a SIGKILL never tears a line); the parent reads with ``select`` so it never blocks on a
dead child. Scenarios that measure a real restart (``mttr``) launch real processes under torchrun
instead (``python -m bench._workers mttr ...``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

T0 = time.time()  # first thing: the moment this interpreter reached the module (mttr launch time)

__all__ = [
    "Child",
    "fork_child",
    "small_model",
    "warm",
    "train_step",
    "state_digest",
    "emit",
    "leftovers",
]


# --------------------------------------------------------------------------- model and state
def small_model(width: int = 256, layers: int = 3, seed: int = 0) -> tuple[Any, Any]:
    """An MLP of ``layers`` square Linear layers and AdamW with its state materialised."""
    import torch

    torch.manual_seed(seed)
    mods: list[Any] = []
    for i in range(layers):
        mods.append(torch.nn.Linear(width, width))
        if i < layers - 1:
            mods.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*mods)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def warm() -> None:
    """Pay torch's one-off lazy costs (~1 s: optimizer imports, first kernels) once, before forking.

    Runs single-threaded, so no OpenMP pool exists in the process that forks.
    """
    import torch

    torch.set_num_threads(1)
    model, opt = small_model(8)
    train_step(model, opt, 0)
    state_digest(model, opt, 0)
    import recoverkit.restore.reader  # noqa: F401 - modules recoverkit imports on first use
    import recoverkit.staging.host_tier  # noqa: F401
    import recoverkit.staging.pipeline  # noqa: F401


def width_for(state_bytes: int, layers: int = 3) -> int:
    """Width of small_model whose params + 2 AdamW moments take about ``state_bytes``."""
    return max(8, int((state_bytes / 4 / 3 / layers) ** 0.5))


def train_step(model: Any, opt: Any, step: int, batch: int = 16) -> float:
    """One deterministic optimizer step (the batch depends only on ``step``)."""
    import torch

    width = model[0].in_features
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(batch, width, generator=g)
    loss = model(x).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def state_digest(model: Any, opt: Any, step: int) -> str:
    """A digest of every tensor of the model and the optimizer, and the step counter."""
    import torch

    h = hashlib.blake2b(digest_size=12)
    h.update(str(step).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(_tensor_bytes(v))
    osd = opt.state_dict()
    for pid in sorted(osd["state"]):
        for k, v in sorted(osd["state"][pid].items()):
            h.update(f"{pid}/{k}".encode())
            if torch.is_tensor(v):
                h.update(_tensor_bytes(v))
            else:
                h.update(repr(v).encode())
    return h.hexdigest()


def _tensor_bytes(v: Any) -> bytes:
    return v.detach().reshape(-1).contiguous().view(torch_uint8()).numpy().tobytes()


def torch_uint8() -> Any:
    import torch

    return torch.uint8


# --------------------------------------------------------------------------- files
def leftovers(root: str) -> list[str]:
    """Temporary names an interrupted save or delete left in a checkpoint root."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n.startswith((".tmp-", ".trash-", ".probe-")))


# --------------------------------------------------------------------------- forked children
def emit(fd: int, *parts: Any) -> None:
    """Write one event line to the parent (atomic: well below PIPE_BUF)."""
    line = " ".join(str(p) for p in parts) + "\n"
    os.write(fd, line.encode()[: 4000])


class Child:
    """A forked child and the read end of its event pipe."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd
        self.lines: list[str] = []
        self._buf = b""
        self.eof = False
        self.status: int | None = None

    def poll(self, timeout_s: float) -> list[str]:
        """Read what arrived within ``timeout_s``; return the new complete lines."""
        new: list[str] = []
        if self.eof:
            return new
        r, _, _ = select.select([self.fd], [], [], max(0.0, timeout_s))
        if r:
            data = os.read(self.fd, 1 << 16)
            if not data:
                self.eof = True
            self._buf += data
            *done, self._buf = self._buf.split(b"\n")
            new = [d.decode() for d in done]
            if self.eof and self._buf:
                new.append(self._buf.decode())
                self._buf = b""
            self.lines += new
        return new

    def wait_for(self, prefix: str, timeout_s: float) -> str | None:
        """Read until a line starting with ``prefix`` arrives (returned), EOF or the timeout."""
        for line in self.lines:
            if line.startswith(prefix):
                return line
        deadline = time.monotonic() + timeout_s
        while not self.eof and time.monotonic() < deadline:
            for line in self.poll(min(0.05, deadline - time.monotonic())):
                if line.startswith(prefix):
                    return line
        return None

    def drain_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.eof and time.monotonic() < deadline:
            self.poll(deadline - time.monotonic())

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self, timeout_s: float = 60.0) -> int:
        """Read to EOF (killing the child after ``timeout_s``) and reap it; the wait status."""
        deadline = time.monotonic() + timeout_s
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                deadline = time.monotonic() + 10
                left = 10
            self.poll(min(left, 0.2))
        os.close(self.fd)
        _, status = os.waitpid(self.pid, 0)
        self.status = status
        return status

    @property
    def killed(self) -> bool:
        return self.status is not None and os.WIFSIGNALED(self.status) and os.WTERMSIG(self.status) == signal.SIGKILL

    def events(self, prefix: str) -> list[list[str]]:
        return [line.split()[1:] for line in self.lines if line.startswith(prefix + " ") or line == prefix]

    def json(self, prefix: str = "J") -> Any:
        for line in reversed(self.lines):
            if line.startswith(prefix + " "):
                return json.loads(line[len(prefix) + 1 :])
        return None


def fork_child(fn: Callable[..., Any], *args: Any) -> Child:
    """Run ``fn(write_fd, *args)`` in a forked child; its exceptions become an ``E`` line."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            import torch

            torch.set_num_threads(1)
            fn(w, *args)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            import traceback

            try:
                emit(w, "E", json.dumps(f"{type(e).__name__}: {e} | {traceback.format_exc()[-1500:]}"))
            except OSError:
                pass
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    return Child(pid, r)


# --------------------------------------------------------------------------- mttr worker (real processes)
def event_log(events: str, **extra: Any) -> Callable[..., None]:
    """A function appending one JSON event per call to the file ``events`` (fsync'd; one short
    O_APPEND line, so the lines of several processes never mix), tagged with torchrun's
    restart attempt, the pid and ``extra``."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def log(**ev: Any) -> None:
        ev.update(attempt=attempt, pid=os.getpid(), **extra)
        with open(events, "a") as f:
            f.write(json.dumps(ev) + "\n")
            f.flush()
            os.fsync(f.fileno())

    return log


def mttr_tiers(source: str, save_every: int, purl: str | None = None) -> list[Any]:
    """The tier list of an MTTR job restoring from ``source``; per-step snapshots in memory.

    ``local``/``persistent``: the in-process host snapshot every step + that durable tier
    every ``save_every`` steps; ``shm``: the shared-memory tier every step + local disk every
    ``save_every``; ``replica``: ``shm`` + a replica of every step on a peer node.
    """
    from recoverkit import TierSpec

    if source == "local":
        return [TierSpec.host(keep=1), TierSpec.local(every_steps=save_every)]
    if source == "persistent":
        assert purl
        return [TierSpec.host(keep=1), TierSpec.persistent(purl, every_steps=save_every)]
    if source in ("shm", "replica"):
        tiers = [TierSpec.shm()]  # type: ignore[attr-defined]
        if source == "replica":
            tiers.append(TierSpec.replica(k=1))  # type: ignore[attr-defined]
        return tiers + [TierSpec.local(every_steps=save_every)]
    raise ValueError(f"unknown MTTR source {source!r}")


def memory_tiers_missing(source: str) -> str | None:
    """None when this recoverkit has the tiers ``source`` needs, else what is missing."""
    if source not in ("shm", "replica"):
        return None
    from recoverkit.staging.registry import tier_kinds

    need = ["shm"] + (["replica"] if source == "replica" else [])
    missing = [k for k in need if k not in tier_kinds()]
    return f"tier kind(s) {missing} not registered in this recoverkit" if missing else None


def lose_node(shm_dir: str, node: str) -> None:
    """What losing a node takes from a simulated node: its shared memory (every job's)."""
    import shutil

    shutil.rmtree(os.path.join(shm_dir, "recoverkit", node), ignore_errors=True)


def _wait_replicated(ckpt: Any, rank: int, step: int, timeout_s: float) -> int | None:
    """Wait (at most ``timeout_s``) until a peer holds ``rank``'s replica of ``step``; the
    newest step a peer holds then (None: none)."""
    tier = ckpt.tiers.get("replica")
    held: int | None = None
    deadline = time.monotonic() + timeout_s
    while tier is not None and time.monotonic() < deadline:
        held = max(tier.holdings().get(rank, {}).values(), default=None)
        if held is not None and held >= step:
            break
        time.sleep(0.01)
    return held


def _mttr_worker(cfg: dict[str, Any]) -> None:
    """python -m bench._workers mttr CONFIG_JSON

    One rank of an MTTR job under torchrun (one process, or DDP over gloo when torchrun's
    ``WORLD_SIZE`` > 1, each rank's batch keyed by (step, rank)): opens a Checkpointer on
    ``root`` with the tiers of ``source`` (see :func:`mttr_tiers`), restores the newest valid
    step (``in_place``: inside ``in_place_reads()``), trains to ``steps`` with ``save_async``
    every step. On torchrun's first attempt the last rank, after step ``die_at`` and once the
    saves made so far have drained (a steady-state crash), waits until a peer holds its
    replica of that step (``source == "replica"``, bounded), loses its node (its shared
    memory is deleted) and SIGKILLs itself. Appends JSON events with wall-clock times to
    ``events``: launched, imported (+ the process group and the model), opened (Checkpointer
    start-up), restored (discovery, verified read, apply), first_step, kill, done.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    log = event_log(cfg["events"], rank=rank)
    log(event="launched", t=T0)
    import torch

    from recoverkit import Checkpointer, CheckpointNotFoundError, CheckpointOptions, RetentionPolicy
    from recoverkit.config import StagingPolicy

    if world > 1:
        from datetime import timedelta

        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    log(event="imported", t=time.time())
    torch.set_num_threads(1)
    width, steps, die_at = int(cfg["width"]), int(cfg["steps"]), int(cfg["die_at"])
    net, opt = small_model(width)
    model = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net)
    nbytes = sum(p.numel() * 4 for p in net.parameters()) * 3
    opts = CheckpointOptions(
        tiers=mttr_tiers(cfg["source"], int(cfg["save_every"]), cfg.get("purl")),
        retention=RetentionPolicy(keep_last=2), staging=StagingPolicy(budget_bytes=3 * nbytes + (16 << 20)),
        commit_timeout_s=20.0,
    )
    state = {"model": model, "optimizer": opt}
    t_enter = time.time()
    ckpt = Checkpointer(cfg["root"], options=opts)
    t_open = time.time()
    reads: Any = contextlib.nullcontext()
    if cfg.get("in_place"):  # tensors a memory tier holds copied straight into the live ones
        from recoverkit.restore.reader import in_place_reads

        reads = in_place_reads()
    try:
        with reads:
            resumed: int | None = int(ckpt.restore(state))
    except CheckpointNotFoundError:
        resumed = None
    log(event="restored", t=time.time(), t_enter=t_enter, t_open=t_open, resumed=resumed, bytes=nbytes)
    first = True
    for step in range((resumed or 0) + 1, steps + 1):
        g = torch.Generator().manual_seed(1000 * step + rank)
        loss = model(torch.randn(16, width, generator=g)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ckpt.save_async(step, state)
        if first:
            log(event="first_step", t=time.time(), step=step)
            first = False
        if step == die_at and attempt == 0 and rank == world - 1:
            ckpt.wait()  # the saves made so far have drained (a steady-state crash)
            if cfg["source"] == "replica":
                log(event="replicated", t=time.time(), held=_wait_replicated(ckpt, rank, step, 30.0))
                lose_node(os.environ.get("RECOVERKIT_SHM_DIR", "/dev/shm"), os.environ["RECOVERKIT_NODE"])
            log(event="kill", t=time.time(), step=step)
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()
    log(event="done", t=time.time(), step=steps)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "mttr":
        _mttr_worker(json.loads(sys.argv[2]))
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]!r}")
