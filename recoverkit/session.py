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
the next batch; every ``save_every`` steps the state is saved lazily (``save_async``), and
when the loop runs out (``epochs`` or ``max_steps``) its final step is saved too (once).
Each committed save is one INFO line on the ``recoverkit`` logger (``log_saves=False`` or
the logger's level turns it off).

SIGTERM/SIGINT (to the process or to its whole group: DataLoader workers are moved out of
it, see :mod:`recoverkit.health.signals`) let the current step finish, then the
newest state is made durable within ``grace_s`` and the process exits with ``128 + signal``
(143 for SIGTERM, 130 for SIGINT); a second signal exits at once. On normal exit pending
saves are flushed; on an exception only already-consistent saves are flushed (the state
mid-step is never committed) and the exception propagates.

A lazy save that fails does not stop training: the Checkpointer logs it once (logger
``recoverkit``, as an error) and ``run.failed_saves`` lists it. When the loop ends, failed
saves are not passed over: ``on_failed_saves="raise"`` (default) raises a CommitError
naming them after everything is flushed and released, ``"exit"`` exits with status 1 after
one error line, ``"warn"`` only logs a warning.

Entering ``protect`` takes the root's run lock, a staging pipeline and the signal handlers;
every way out (a failure on entry included) gives all of them back. Snapshots kept in shared
memory (a ``shm`` tier) are deleted only when the loop ends normally; after an exception or
a preemption signal they stay for the restarted process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any

import torch

from .checkpointer import Checkpointer, _failed_saves_error
from .config import CheckpointOptions, OnFailedSaves, ProtectOptions
from .errors import CheckpointNotFoundError, CommitError
from .health.loss import LossGuard, as_float
from .health.signals import PreemptionSignals, exit_code_for, quiet_workers
from .state.keyed_rng import keyed_rng

__all__ = ["protect", "Run", "exit_code_for"]

log = logging.getLogger("recoverkit")

FAILED_SAVES_EXIT_CODE = 1
_DEFAULTS = ProtectOptions()  # protect()'s keyword defaults: read from the options, never restated


class _Counters:
    """Loop counters and skipped batches, saved with the state."""

    def __init__(self) -> None:
        self.step = 0
        self.skip: list[list[int]] = []  # [epoch, batch index] of batches the guard rejected

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skip": [list(x) for x in self.skip]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self.skip = [list(x) for x in sd.get("skip", [])]


class Run:
    """The object ``protect`` yields: iterate it for batches; see the module docstring."""

    def __init__(self, *, state: Mapping[str, Any], loader: Any, options: ProtectOptions, checkpointer: Checkpointer) -> None:
        #: how the loop is driven (``protect``'s keyword arguments)
        self.options = options
        self._user_loader = loader
        self.ckpt = checkpointer
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
            # recoverkit.state.loader). ``seed`` no longer changes the data order.
            from .state.loader import resumable_loader

            self.loader, self.position = resumable_loader(loader)
            self.state["__data__"] = self.position
        self.resumed_from: int | None = None
        self._loss_guard = LossGuard(spike_factor=options.spike_factor)
        self._restart = False
        self._rejected = False
        self._current: tuple[int, int] | None = None
        self._key: tuple[int | str, ...] | None = None
        self._last_handle: Any = None
        #: (step, error) of every lazy save that failed (each is also logged as an error)
        self.failed_saves: list[tuple[int, BaseException]] = []
        self._signals = PreemptionSignals()
        self._unquiet: Callable[[], None] | None = None
        self._closed = False
        #: keep snapshots that outlive the process (shared memory) when the Checkpointer is
        #: closed: only a loop that ended normally (no exception, no signal) ends the job
        self._keep_snapshots = True
        self._saved_step: int | None = None  # the newest step saved (or restored): never saved twice
        self._unlogged: list[Any] = []  # handles of saves whose commit is not logged yet

    # the loop's options, by name (read-only: they live in ``options``)
    save_every = property(lambda self: self.options.save_every)
    epochs = property(lambda self: self.options.epochs)
    max_steps = property(lambda self: self.options.max_steps)
    grace_s = property(lambda self: self.options.grace_s)
    spike_factor = property(lambda self: self.options.spike_factor)
    on_failed_saves = property(lambda self: self.options.on_failed_saves)
    log_saves = property(lambda self: self.options.log_saves)

    @property
    def rng_key(self) -> tuple[int | str, ...] | None:
        """The key of the current batch's random streams (``None`` between steps):
        ``("protect", epoch, batch index in the epoch, rank)``; with a loader that saves its
        own position, ``("protect", epoch, step, rank)``. The body runs under
        ``keyed_rng(seed, *run.rng_key)`` when ``keyed_rng=True``; use the same key for
        other streams, e.g. ``np.random.default_rng(keyed_seed(run.options.seed, *run.rng_key))``."""
        return self._key

    # ------------------------------------------------------------- lifecycle
    def start(self) -> Run:
        """Restore the newest valid step, quiet the loader's workers, install the handlers.

        On any failure everything taken so far (the run lock included) is released first.
        """
        try:
            try:
                self.resumed_from = self.ckpt.restore(self.state)
                log.info("recoverkit: resumed from step %d", self.resumed_from)
            except CheckpointNotFoundError:
                self.resumed_from = None
            self._saved_step = self.resumed_from
            self._unquiet = quiet_workers(self._user_loader, self.loader)
            self._signals.install()
        except BaseException:
            self.release()
            raise
        return self

    def finish(self, exc: BaseException | None = None) -> None:
        """Flush saves already made (they are consistent; a step cut short is never saved),
        release everything, then apply ``on_failed_saves`` if the loop ended normally.

        ``exc``: the exception leaving the loop, if any (it propagates; failed saves are
        then only logged). After a preemption exit, saves still in flight past the grace
        period are not waited for (the process is leaving; the OS drops the lock).
        """
        if exc is not None and not isinstance(exc, SystemExit):
            log.warning("recoverkit: the loop failed at step %d; flushing saves made so far", self.counters.step)
        if self.preempted is not None and isinstance(exc, SystemExit):  # from _exit_preempted
            self._check_saves()
            self.release(close=self.ckpt.settle(0))
            return
        self._keep_snapshots = self.preempted is not None or not (
            exc is None or (isinstance(exc, SystemExit) and not exc.code)
        )
        try:
            self._settle()
            self._check_saves()
        finally:
            self.release()
        self._log_committed()
        if exc is None or (isinstance(exc, SystemExit) and not exc.code):
            self._report_failed_saves()

    def release(self, *, close: bool = True) -> None:
        """Give back what ``start`` took: signal handlers, the loader workers'
        ``worker_init_fn``, and (``close``) the staging pipeline and the run lock.
        Idempotent. A preempted run leaves saves still in flight after the grace period
        with ``close=False``: closing would wait for them; the process is exiting."""
        self._signals.restore()
        stream = self.__dict__.pop("_stream", None)
        close_stream = getattr(stream, "close", None)
        if close_stream is not None:  # stop the loader's workers now, not at interpreter exit
            close_stream()
        if self._unquiet is not None:
            self._unquiet()
            self._unquiet = None
        if self._closed or not close:
            return
        self._closed = True
        try:
            self.ckpt.close(keep_snapshots=self._keep_snapshots)
        except CommitError as e:  # only a save made meanwhile by another thread: logged already
            self.failed_saves.append((e.step if e.step is not None else -1, e))

    def _settle(self) -> None:
        """Wait for every save; once a signal has arrived, for at most ``grace_s`` more
        (a second signal still exits at once: the handlers stay until ``release``)."""
        while not self.ckpt.settle(0.25):
            if self.preempted is not None:
                if not self.ckpt.settle(self.grace_s):
                    log.error("recoverkit: saves still in flight after %.1f s of grace", self.grace_s)
                return

    def _report_failed_saves(self) -> None:
        if not self.failed_saves:
            return
        steps = ", ".join(str(s) for s in sorted({s for s, _ in self.failed_saves}))
        if self.on_failed_saves == "warn":
            log.warning("recoverkit: %d save(s) failed (steps %s); see run.failed_saves", len(self.failed_saves), steps)
            return
        if self.on_failed_saves == "exit":
            log.error("recoverkit: %d save(s) failed (steps %s); exiting with status %d",
                      len(self.failed_saves), steps, FAILED_SAVES_EXIT_CODE)
            raise SystemExit(FAILED_SAVES_EXIT_CODE)
        raise _failed_saves_error(sorted(self.failed_saves, key=lambda f: f[0]))

    @property
    def preempted(self) -> int | None:
        """The preemption signal's number, once one arrived (else None)."""
        return self._signals.received

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
                break
            try:
                batch = self._next_batch()
            except (RuntimeError, EOFError, ConnectionError):
                if self.preempted is None:
                    raise
                # a loader whose workers we could not reach died of the group's signal (a
                # worker's death, or its pipe closing while a batch's tensors were handed over)
                log.warning("recoverkit: the data loader failed after the signal; saving step %d", self.counters.step)
                self._exit_preempted()
            if batch is None:
                break
            if self.options.keyed_rng and self._key is not None:
                # the body runs while this generator waits at the yield: inside the keyed
                # streams; they are left (outer streams back) before the step is counted
                # and saved, or when the loop is left (the generator is closed)
                with keyed_rng(self.options.seed, *self._key):
                    yield batch
            else:
                yield batch
            self._key = None
        if self.counters.step > 0 and self._saved_step != self.counters.step:
            self._save_now()  # the final step, whatever save_every is

    def _batches(self) -> Generator[Any, None, None]:
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
                    self._key = ("protect", epoch, self.counters.step, _rank())
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
                self._key = ("protect", *where, _rank())
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
        if self.counters.step % self.save_every == 0 and self.preempted is None:
            self._save_now()
        if self.preempted is not None:
            self._exit_preempted()

    def save(self) -> Any:
        """Save the state at the current step boundary now (lazily); return the handle."""
        return self._save_now()

    def _save_now(self) -> Any:
        handle = self.ckpt.save_async(self.counters.step, self.state)
        self._last_handle = handle
        self._saved_step = self.counters.step
        if self.log_saves:
            self._unlogged.append(handle)
        return handle

    def _check_saves(self) -> None:
        """Collect lazy saves that failed since the last check (the Checkpointer logged each
        once): training goes on, nobody is left unaware. Saves committed since the last
        check get their INFO line."""
        self.failed_saves.extend(self.ckpt.take_failed_saves())
        self._log_committed()

    def _log_committed(self) -> None:
        """One INFO line per committed save: step, tiers, bytes, and how long the loop stalled
        for it (the call plus the optimizer's pre-step wait). Superseded saves (a newer
        save was written instead) and failed ones (logged as errors) get none."""
        pending = []
        for h in self._unlogged:
            if not h.done():
                pending.append(h)
                continue
            where = list(h.committed_to) or ([] if h.superseded or h.tiers else ["host memory"])
            if h.error is not None or not where:
                continue
            m = h.metrics
            stall_ms = 1e3 * (m.get("call_s", 0.0) + m.get("prestep_wait_s", 0.0))
            who = f"rank {self.ckpt.rank}: " if self.ckpt.world_size > 1 else ""
            log.info("recoverkit: %ssaved step %d to %s (%s, training stalled %.1f ms)",
                     who, h.step, ", ".join(where), _size(int(m.get("bytes", 0))), stall_ms)
        self._unlogged = pending

    # ------------------------------------------------------------- loss guard
    def guard(self, loss: torch.Tensor | float) -> bool:
        """False (and roll back to the last good snapshot) if ``loss`` is non-finite or spikes.

        Call it before ``backward()``; on False, ``continue`` to the next batch: the state is
        back at the last snapshot, the data stream resumes from there and the offending batch
        is skipped. The judgement is :class:`recoverkit.health.loss.LossGuard`'s.
        """
        if self._loss_guard.check(loss):
            return True
        value = as_float(loss)
        offending = [self.position.epoch, self.position.index] if self.position is not None else [0, self.step]
        self.counters.skip.append(offending)
        skip = list(self.counters.skip)
        restored = self.ckpt.restore(self.state)
        self.counters.skip = skip  # the rejection outlives the rollback
        self._saved_step = restored
        log.warning(
            "recoverkit: loss %s at step %d: rolled back to step %d, skipping the batch at epoch %d batch index %d",
            value, self.counters.step, restored, *offending,
        )
        self._current = None
        self._restart = True
        self._rejected = True
        return False

    # ------------------------------------------------------------- preemption
    def _exit_preempted(self) -> None:
        """Save the step reached (unless it is saved already), wait up to ``grace_s`` for it
        to be durable, exit with ``128 + signal``."""
        assert self.preempted is not None
        if self._saved_step != self.counters.step:
            self._save_now()
        handle = self._last_handle
        try:
            if handle is not None and handle.step == self.counters.step and not handle.wait(self.grace_s):
                log.error("recoverkit: step %d not durable within %.1f s", self.counters.step, self.grace_s)
        except Exception as e:  # noqa: BLE001 - the Checkpointer logged it; the exit code still tells
            self.failed_saves.append((handle.step, e))
        raise SystemExit(exit_code_for(self.preempted))


def protect(
    root: str | None = None,
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    loader: Any = None,
    extra: Mapping[str, Any] | None = None,
    save_every: int = _DEFAULTS.save_every,
    epochs: int | None = _DEFAULTS.epochs,
    max_steps: int | None = _DEFAULTS.max_steps,
    grace_s: float = _DEFAULTS.grace_s,
    spike_factor: float | None = _DEFAULTS.spike_factor,
    seed: int = _DEFAULTS.seed,
    keyed_rng: bool = _DEFAULTS.keyed_rng,
    options: CheckpointOptions | None = None,
    checkpointer: Checkpointer | None = None,
    on_failed_saves: OnFailedSaves = _DEFAULTS.on_failed_saves,
    log_saves: bool = _DEFAULTS.log_saves,
) -> _Protected:
    """Protect a training loop; use as ``with protect(...) as run: for batch in run: ...``.

    Two option objects hold every option, each with its one default:
    :class:`~recoverkit.CheckpointOptions` (``options``: how the Checkpointer saves: tiers,
    staging, retention, ...) and :class:`~recoverkit.config.ProtectOptions` (how the loop
    is driven). The loop's keyword arguments below are sugar for a ``ProtectOptions`` with
    the same names and defaults (``run.options``), validated when ``protect`` is called.

    Args:
        root: the checkpoint root (may be left out when ``checkpointer`` is given).
        model, optimizer, scheduler, scaler: one object or a list of them each (DDP and
            FSDP2 modules are fine).
        loader: a DataLoader (rebuilt over its own sampler, whose order is kept exactly and
            resumed by replaying the epoch's random streams and skipping the batches already
            consumed), a loader that saves its own position (``state_dict``/
            ``load_state_dict``, e.g. torchdata's ``StatefulDataLoader``; kept as it is), or
            any other iterable, an ``IterableDataset`` loader included (resumed by counting
            batches: the epoch is iterated again and the consumed batches dropped).
        extra: more Stateful objects or plain values to save.
        save_every, epochs, max_steps, grace_s, spike_factor, on_failed_saves, log_saves:
            the fields of :class:`~recoverkit.config.ProtectOptions` (documented there):
            steps between lazy saves, when the iteration ends, the preemption grace period,
            the loss guard's spike threshold, what a failed lazy save does when the loop
            ends (``"raise"``, ``"exit"`` with status 1, ``"warn"``), one INFO line per save.
        seed, keyed_rng: the body's random streams keyed to the batch
            (:class:`~recoverkit.config.ProtectOptions`); the data order is the loader's own.
        options: the Checkpointer's :class:`~recoverkit.CheckpointOptions`.
        checkpointer: a Checkpointer to use instead of building one from ``root`` and
            ``options``; ``protect`` owns it from then on and closes it however the block
            ends (a failure on entry included). A ``root`` or ``options`` that differ from
            its own is a ValueError naming both (raised by this call, which then leaves the
            checkpointer to the caller).

    Raises:
        ConfigError: a loop option is invalid (a ValueError).
        ValueError: no ``root`` and no ``checkpointer``, or ones that disagree.

    Nothing is taken (lock, pipeline, handlers) until the ``with`` block is entered.

    Example:
        >>> import tempfile, torch, recoverkit
        >>> model = torch.nn.Linear(2, 2)
        >>> with recoverkit.protect(tempfile.mkdtemp(), model=model, loader=range(4), save_every=2) as run:
        ...     for batch in run:
        ...         pass
        >>> run.step, run.options.save_every
        (4, 2)
    """
    loop = ProtectOptions(save_every=save_every, epochs=epochs, max_steps=max_steps, grace_s=grace_s,
                          spike_factor=spike_factor, on_failed_saves=on_failed_saves, log_saves=log_saves,
                         keyed_rng=keyed_rng, seed=seed)
    _check_checkpointer(root, options, checkpointer)
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

    def build() -> Run:
        assert checkpointer is not None or root is not None  # _check_checkpointer
        ckpt = checkpointer or Checkpointer(root, options=options)  # type: ignore[arg-type]
        try:
            return Run(state=state, loader=loader, options=loop, checkpointer=ckpt)
        except BaseException:
            ckpt.close(keep_snapshots=True)  # nothing saved: stops the pipeline, drops the lock
            raise

    return _Protected(build)


def _check_checkpointer(root: str | None, options: CheckpointOptions | None, checkpointer: Checkpointer | None) -> None:
    """A ``checkpointer`` is the source of truth for its root and options: ``root`` and
    ``options`` passed beside it must say the same, or the call is refused."""
    if checkpointer is None:
        if root is None:
            raise ValueError("protect() needs a root (the checkpoint directory) or a checkpointer=")
        return
    if root is not None and os.path.realpath(root) != os.path.realpath(checkpointer.root):
        raise ValueError(
            f"protect(): root {root!r} is not the root of the checkpointer= given ({checkpointer.root!r}); "
            "pass the same root, or leave root out"
        )
    if options is not None and options != checkpointer.options:
        raise ValueError(
            f"protect(): options {options!r} differ from the options of the checkpointer= given "
            f"({checkpointer.options!r}); pass the same options, or leave options out"
        )


class _Protected:
    """The ``with`` block: builds and starts the Run on entry, finishes it on exit."""

    def __init__(self, build: Callable[[], Run]) -> None:
        self._build = build
        self.run: Run | None = None

    def __enter__(self) -> Run:
        self.run = self._build()
        return self.run.start()  # releases everything itself if it fails

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.run is not None
        run = self.run
        run.finish(exc)
        if run.preempted is not None and isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc):
            # workers we could not reach died of the group's signal mid-step: that step is
            # lost, the saves before it were flushed; the launcher still sees a preemption
            log.warning("recoverkit: the data loader's workers died of %s at step %d", run.preempted, run.step)
            raise SystemExit(exit_code_for(run.preempted)) from exc


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def _size(nbytes: int) -> str:
    """``nbytes`` for a log line: 512 B, 30.4 KiB, 1.2 GiB."""
    value, unit = float(nbytes), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{nbytes} B" if unit == "B" else f"{value:.1f} {unit}"
