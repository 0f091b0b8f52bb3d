"""Preemption signals: SIGTERM/SIGINT for the training process, not for its DataLoader workers.

Where it sits: ``protect()`` (:mod:`recoverkit.session`) installs :class:`PreemptionSignals`
on entry and removes it on exit; the loop reads :attr:`PreemptionSignals.received` at each
step boundary, saves that step and exits with :func:`exit_code_for`.

Launchers (SLURM, torchrun, a terminal's Ctrl-C) signal the whole process group, so the
loader's worker processes get the signal too. A worker's default reaction (torch installs a
SIGTERM handler that re-raises it) kills it, and the trainer then fails with ``DataLoader
worker ... killed by signal: Terminated`` before it can save. :func:`quiet_workers` chains a
``worker_init_fn`` that moves each worker into a process group of its own: signals for the
trainer's group no longer reach it, so the trainer alone decides when to stop, while a
signal sent to the worker itself (``Process.terminate()`` by torch or multiprocessing when
they shut workers down) still works as before. (Ignoring the signals instead would make
that shutdown wait forever.) Should the trainer die, its workers notice within seconds by
torch's own check that their parent is alive. A signal that reaches a forked worker before
its ``worker_init_fn`` runs finds the inherited handler, which ignores signals outside the
process that installed it (so SIGINT warns once, not once per worker).

Workers this module cannot reach (a loader hiding its DataLoader, a worker signalled before
its ``worker_init_fn`` ran) may still die of the group's signal. torch reports that from its
SIGCHLD handler, as a RuntimeError raised wherever the trainer happens to be, mid-step
included. Once a preemption signal has arrived, :class:`PreemptionSignals` holds that error
back: the step in progress finishes and is saved as for any preemption (and should the
loader be asked for another batch first, ``protect`` treats its error the same way).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

__all__ = ["PREEMPTION_SIGNALS", "PreemptionSignals", "OwnProcessGroup", "exit_code_for", "quiet_workers"]

log = logging.getLogger("recoverkit")

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code_for(signum: int) -> int:
    """The documented exit code after a preemption signal: ``128 + signum``.

    Example:
        >>> exit_code_for(signal.SIGTERM)
        143
    """
    return 128 + signum


class PreemptionSignals:
    """Records the first SIGTERM/SIGINT (a warning, once); a second one exits at once.

    ``install`` only works in the main thread (elsewhere it does nothing, as Python allows
    handlers only there); ``restore`` puts the previous handlers back and may be called
    any number of times.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._wrap_sigchld()

    def _wrap_sigchld(self) -> None:
        """Put a wrapper around torch's SIGCHLD handler (installed now if it was not yet,
        as torch does for the first multi-process loader) that holds back its worker-died
        error once a preemption signal has arrived."""
        try:
            from torch.utils.data._utils import signal_handling

            signal_handling._set_SIGCHLD_handler()
        except (ImportError, AttributeError):  # another torch: its error is not held back
            return
        inner = signal.getsignal(signal.SIGCHLD)
        if not callable(inner):
            return

        def on_child(signum: int, frame: Any) -> None:
            try:
                inner(signum, frame)
            except RuntimeError as e:
                if self.received is None or os.getpid() != self._pid:
                    raise
                log.warning("recoverkit: after %s: %s", signal.Signals(self.received).name, e)

        self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, on_child)

    def restore(self) -> None:
        """Put the previous handlers back. After a preemption signal the SIGCHLD wrapper
        stays: the process is on its way out, and workers still dying of that signal
        must not turn the exit into a RuntimeError."""
        for sig, handler in list(self._previous.items()):
            if sig == signal.SIGCHLD and self.received is not None:
                continue
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            del self._previous[sig]

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the trainer handles it
            return
        if self.received is not None:  # second signal: leave now
            os._exit(exit_code_for(signum))
        self.received = signum
        log.warning("recoverkit: %s received: finishing this step, then saving", signal.Signals(signum).name)


class OwnProcessGroup:
    """A DataLoader ``worker_init_fn``: leave the trainer's process group, then call the
    user's own ``worker_init_fn``.

    A class rather than a closure so that loaders whose workers are spawned (not forked)
    can pickle it, as long as the user's function pickles.
    """

    def __init__(self, inner: Callable[[int], Any] | None) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        try:
            os.setpgid(0, 0)
        except OSError as e:  # a session leader cannot; it still works, only less quietly
            log.debug("recoverkit: DataLoader worker %d stays in its parent's process group: %s", worker_id, e)
        if self.inner is not None:
            self.inner(worker_id)


def quiet_workers(*loaders: Any) -> Callable[[], None]:
    """Make every multi-process DataLoader in ``loaders`` start workers in process groups
    of their own; return a function that puts their ``worker_init_fn`` back.

    Looks at each object and, one level down, at its attributes (a wrapper such as the
    rebuilt loader ``protect`` iterates keeps its DataLoader in one). Only iterators
    created afterwards are affected; a DataLoader already quiet is left alone.
    """
    changed: list[tuple[DataLoader, Any]] = []
    seen: set[int] = set()
    for obj in loaders:
        candidates = [obj] + ([v for v in vars(obj).values()] if hasattr(obj, "__dict__") and not isinstance(obj, DataLoader) else [])
        for dl in candidates:
            if not isinstance(dl, DataLoader) or id(dl) in seen:
                continue
            seen.add(id(dl))
            if dl.num_workers > 0 and not isinstance(dl.worker_init_fn, OwnProcessGroup):
                changed.append((dl, dl.worker_init_fn))
                dl.worker_init_fn = OwnProcessGroup(dl.worker_init_fn)

    def undo() -> None:
        while changed:
            dl, original = changed.pop()
            dl.worker_init_fn = original

    return undo
