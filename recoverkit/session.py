"""``recoverkit.protect``: a training loop with auto-resume, lazy saves and preemption.

::

    with recoverkit.protect(root, model=model, optimizer=opt, scheduler=sched, loader=loader) as run:
        for batch in run:                 # resumes at the right step and batch
            loss = model(batch).mean()
            if not run.guard(loss):       # optional: non-finite / spiking loss
                continue
            loss.backward(); opt.step(); opt.zero_grad(); sched.step()

On entry the newest valid checkpoint (any tier) is restored: model, optimizers,
schedulers, scaler, every RNG and the data position. A step ends when the loop asks for
the next batch; every ``save_every`` steps the state is saved lazily (``save_async``).
SIGTERM/SIGINT let the current step finish, then the newest state is made durable within
``grace_s`` and the process exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT);
a second signal exits at once. On normal exit pending saves are flushed; on an exception
only already-consistent saves are flushed (the state mid-step is never committed) and the
exception propagates.

A lazy save that fails does not stop training: the Checkpointer logs it once (logger
``recoverkit``, as an error) and ``run.failed_saves`` lists it; leaving the loop never
raises for it either.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from .checkpointer import Checkpointer
from .config import CheckpointOptions
from .errors import CheckpointNotFoundError, CommitError

__all__ = ["protect", "Run", "exit_code_for"]

log = logging.getLogger("recoverkit")


def exit_code_for(signum: int) -> int:
    """The documented exit code after a preemption signal: ``128 + signum``."""
    return 128 + signum


class _Counters:
    """Loop counters and skipped batches, saved with the state."""

    def __init__(self) -> None:
        self.step = 0
        self.skip: list[list[int]] = []  # [epoch, sample index] of batches the guard rejected

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skip": [list(x) for x in self.skip]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self.skip = [list(x) for x in sd.get("skip", [])]


class Run:
    """The object ``protect`` yields: iterate it for batches; see the module docstring."""

    def __init__(
        self,
        root: str,
        *,
        state: Mapping[str, Any],
        loader: Any,
        save_every: int,
        epochs: int | None,
        max_steps: int | None,
        grace_s: float,
        spike_factor: float | None,
        seed: int,
        options: CheckpointOptions | None,
        checkpointer: Checkpointer | None,
    ) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.ckpt = checkpointer or Checkpointer(root, options=options)
        self.counters = _Counters()
        self.state: dict[str, Any] = dict(state)
        self.state["__run__"] = self.counters
        self.loader = loader
        self.position = None
        if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)):
            self.state["__data__"] = loader  # resumes itself (torchdata's StatefulDataLoader)
        elif loader is not None:
            # The user's own sampling, kept exactly; the position is the batches consumed
            # of the current epoch and what the epoch's order was drawn from (see
            # recoverkit.integrations.pytorch). ``seed`` no longer changes the data order.
            from recoverkit.integrations.pytorch import resumable_loader

            self.loader, self.position = resumable_loader(loader)
            self.state["__data__"] = self.position
        self.save_every = save_every
        self.epochs = epochs
        self.max_steps = max_steps
        self.grace_s = grace_s
        self.spike_factor = spike_factor
        self.resumed_from: int | None = None
        self.preempted: int | None = None  # the signal number, once one arrived
        self._loss_ema: float | None = None
        self._losses_seen = 0
        self._restart = False
        self._rejected = False
        self._current: tuple[int, int] | None = None
        self._last_handle: Any = None
        #: (step, error) of every lazy save that failed (each is also logged as an error)
        self.failed_saves: list[tuple[int, BaseException]] = []
        self._old_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------- lifecycle
    def start(self) -> Run:
        try:
            self.resumed_from = self.ckpt.restore(self.state)
            log.info("recoverkit: resumed from step %d", self.resumed_from)
        except CheckpointNotFoundError:
            self.resumed_from = None
        self._install_signals()
        return self

    def finish(self, failed: bool) -> None:
        """Flush saves already made (they are consistent; a step cut short is never saved)."""
        self._restore_signals()
        if failed:
            log.warning("recoverkit: the loop failed at step %d; flushing saves made so far", self.counters.step)
        if self.preempted is not None:
            return  # _exit_preempted already waited up to the grace period; the OS drops the lock
        try:
            self._check_saves(wait=True)
        finally:
            try:
                self.ckpt.close()
            except CommitError as e:  # only a save made meanwhile by another thread: logged already
                self.failed_saves.append((e.step if e.step is not None else -1, e))

    @property
    def step(self) -> int:
        """Steps completed (and the step the next save will carry)."""
        return self.counters.step

    @property
    def epoch(self) -> int:
        return self.position.epoch if self.position is not None else 0

    # ------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Any]:
        first = True
        while True:
            if not first:
                self._end_step()
            first = False
            if self.max_steps is not None and self.counters.step >= self.max_steps:
                return
            batch = self._next_batch()
            if batch is None:
                return
            yield batch

    def _batches(self) -> Iterator[Any]:
        """The data stream from the current position, across epochs, minus skipped batches.

        With a position (every loader but one that resumes itself) each epoch's batches
        come from ``epoch_batches()``, which resumes mid-epoch; positions count batches.
        """
        pos = self.position
        if pos is None:  # a loader that saves its own position (StatefulDataLoader)
            epoch = 0
            while self.epochs is None or epoch < self.epochs:
                for batch in self.loader:
                    self._current = (epoch, 1)
                    yield batch
                epoch += 1
            return
        while self.epochs is None or pos.epoch < self.epochs:
            epoch = pos.epoch
            for batch in self.loader.epoch_batches():
                where = [pos.epoch, pos.index]
                if where in self.counters.skip:
                    pos.advance(1)
                    log.warning("recoverkit: skipping the batch at epoch %d batch %d (rejected by the loss guard)", *where)
                    continue
                self._current = (epoch, 1)
                yield batch
            pos.next_epoch()

    def _next_batch(self) -> Any:
        if not hasattr(self, "_stream") or self._restart:
            self._restart = False
            self._stream = self._batches()
        try:
            batch = next(self._stream)
        except StopIteration:
            return None
        if self.max_steps is not None and self.counters.step + 1 >= self.max_steps:
            self._stream.close()  # the run's last batch: the loader's workers are released now
        return batch

    def _end_step(self) -> None:
        """The previous batch's step is complete: count it, save per policy, obey signals."""
        if self._rejected:  # the guard rolled back instead: nothing to count
            self._rejected = False
            return
        if self.position is not None and self._current is not None:
            self.position.advance(self._current[1])
        self._current = None
        self.counters.step += 1
        self._check_saves()
        if self.counters.step % self.save_every == 0 or self.preempted is not None:
            self._track(self.ckpt.save_async(self.counters.step, self.state))
        if self.preempted is not None:
            self._exit_preempted()

    def save(self) -> Any:
        """Save the state at the current step boundary now (lazily); return the handle."""
        return self._track(self.ckpt.save_async(self.counters.step, self.state))

    def _track(self, handle: Any) -> Any:
        self._last_handle = handle
        return handle

    def _check_saves(self, *, wait: bool = False) -> None:
        """Collect lazy saves that failed since the last check (the Checkpointer logged each
        once): training goes on, nobody is left unaware. ``wait``: every save settles first."""
        if wait:
            self.ckpt.settle()
        self.failed_saves.extend(self.ckpt.take_failed_saves())

    # ------------------------------------------------------------- loss guard
    def guard(self, loss: torch.Tensor | float) -> bool:
        """False (and roll back to the last good snapshot) if ``loss`` is non-finite or spikes.

        Call it before ``backward()``; on False, ``continue`` to the next batch: the state is
        back at the last snapshot, the data stream resumes from there and the offending batch
        is skipped.
        """
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        bad = not math.isfinite(value)
        if not bad and self.spike_factor is not None and self._loss_ema is not None and self._losses_seen >= 10:
            bad = value > self.spike_factor * self._loss_ema
        if not bad:
            self._loss_ema = value if self._loss_ema is None else 0.9 * self._loss_ema + 0.1 * value
            self._losses_seen += 1
            return True
        offending = [self.position.epoch, self.position.index] if self.position is not None else [0, self.step]
        self.counters.skip.append(offending)
        skip = list(self.counters.skip)
        restored = self.ckpt.restore(self.state)
        self.counters.skip = skip  # the rejection outlives the rollback
        log.warning(
            "recoverkit: loss %s at step %d: rolled back to step %d, skipping the batch at epoch %d sample %d",
            value, self.counters.step, restored, *offending,
        )
        self._current = None
        self._restart = True
        self._rejected = True
        return False

    # ------------------------------------------------------------- signals
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.preempted is not None:  # second signal: leave now
            os._exit(exit_code_for(signum))
        self.preempted = signum
        log.warning("recoverkit: %s received: finishing this step, then saving", signal.Signals(signum).name)

    def _exit_preempted(self) -> None:
        assert self.preempted is not None
        handle = self._last_handle
        try:
            if handle is None or not handle.wait(self.grace_s):
                log.error("recoverkit: step %d not durable within %.1f s", self.counters.step, self.grace_s)
        except Exception as e:  # noqa: BLE001 - the Checkpointer logged it; the exit code still tells
            self.failed_saves.append((handle.step, e))
        raise SystemExit(exit_code_for(self.preempted))


def protect(
    root: str,
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    loader: Any = None,
    extra: Mapping[str, Any] | None = None,
    save_every: int = 100,
    epochs: int | None = 1,
    max_steps: int | None = None,
    grace_s: float = 30.0,
    spike_factor: float | None = None,
    seed: int = 0,
    options: CheckpointOptions | None = None,
    checkpointer: Checkpointer | None = None,
) -> _Protected:
    """Protect a training loop; use as ``with protect(...) as run: for batch in run: ...``.

    Args:
        root: the checkpoint root.
        model, optimizer, scheduler, scaler: one object or a list of them each (DDP and
            FSDP2 modules are fine).
        loader: a DataLoader (rebuilt over a resumable sampler), a loader that saves its own
            position (``state_dict``/``load_state_dict``, e.g. torchdata's
            ``StatefulDataLoader``; kept as it is), or any iterable.
        extra: more Stateful objects or plain values to save.
        save_every: steps between lazy saves.
        epochs / max_steps: when the iteration ends (``epochs=None``: until max_steps).
        grace_s: how long a preempted run waits for its final save to be durable.
        spike_factor: reject a loss above this multiple of its running average.
        seed: seeds the data order and the loader's worker seeds per epoch.
    """
    state: dict[str, Any] = {}
    for name, value in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                state[f"{name}{i}"] = v
        else:
            state[name] = value
    state.update(extra or {})
    run = Run(
        root, state=state, loader=loader, save_every=save_every, epochs=epochs, max_steps=max_steps,
        grace_s=grace_s, spike_factor=spike_factor, seed=seed, options=options, checkpointer=checkpointer,
    )
    return _Protected(run)


class _Protected:
    def __init__(self, run: Run) -> None:
        self.run = run

    def __enter__(self) -> Run:
        return self.run.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.run.finish(failed=exc_type is not None and exc_type is not SystemExit)


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    if isinstance(batch, Mapping) and batch:
        return _batch_len(next(iter(batch.values())))
    return 1
