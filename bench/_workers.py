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


def _mttr_worker(argv: list[str]) -> None:
    """python -m bench._workers mttr ROOT EVENTS SOURCE STEPS SAVE_EVERY DIE_AT WIDTH [PURL]

    A job under ``recoverkit.protect``; SIGKILLs itself after step DIE_AT on torchrun's first
    attempt. Appends JSON events with wall-clock times to EVENTS (shared by both attempts).
    """
    root, events, source, steps, save_every, die_at, width = argv[:7]
    purl = argv[7] if len(argv) > 7 else None
    steps_i, save_every_i, die_at_i, width_i = int(steps), int(save_every), int(die_at), int(width)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = event_log(events)
    log(event="launched", t=T0)
    import torch

    import recoverkit
    from recoverkit import CheckpointOptions, RetentionPolicy, TierPolicy
    from recoverkit.config import StagingPolicy

    log(event="imported", t=time.time())
    torch.set_num_threads(1)
    model, opt = small_model(width_i)
    if source == "persistent":
        tiers = TierPolicy(host_keep=1, local_every=0, persistent_url=purl, persistent_every=save_every_i)
    else:
        tiers = TierPolicy(host_keep=1, local_every=save_every_i)
    nbytes = sum(p.numel() * 4 for p in model.parameters()) * 3
    opts = CheckpointOptions(
        tiers=tiers, retention=RetentionPolicy(keep_last=2), staging=StagingPolicy(budget_bytes=4 * nbytes + (16 << 20))
    )
    data = list(range(steps_i))
    t_enter = time.time()
    with recoverkit.protect(root, model=model, optimizer=opt, loader=data, save_every=1, epochs=None,
                            max_steps=steps_i, options=opts) as run:
        log(event="restored", t=time.time(), t_enter=t_enter, resumed=run.resumed_from)
        first = True
        for _ in run:
            train_step(model, opt, run.step + 1)
            done = run.step + 1
            if first:
                log(event="first_step", t=time.time(), step=done)
                first = False
            if done == die_at_i and attempt == 0:
                run.ckpt.wait()  # the saves made so far have drained (a steady-state crash)
                log(event="kill", t=time.time(), step=done)
                os.kill(os.getpid(), signal.SIGKILL)
    log(event="done", t=time.time(), step=run.step)


if __name__ == "__main__":
    if sys.argv[1] == "mttr":
        _mttr_worker(sys.argv[2:])
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]!r}")
