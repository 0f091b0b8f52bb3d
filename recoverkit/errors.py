"""One error hierarchy for recoverkit.

Every error is a :class:`RecoverkitError` and also the builtin exception a caller would
expect, so ``except FileNotFoundError`` and ``except RecoverkitError`` both work. Messages
name what is wrong: the file, the tensor, and the expected versus found values.

This module sits at the bottom of the layering: it imports nothing from recoverkit, and the
native bindings raise these classes directly.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "RecoverkitError",
    "CheckpointNotFoundError",
    "IntegrityError",
    "IncompatibleCheckpointError",
    "CheckpointLockedError",
    "EncodeError",
    "PickleNotAllowedError",
    "PoolExhaustedError",
    "CopyError",
    "CommitError",
    "CommitTimeoutError",
    "StorageError",
    "RankFailure",
    "ConfigError",
    "TransportError",
    "PeerLostError",
    "PeerTimeoutError",
    "RegroupError",
    "add_note",
]


class RecoverkitError(Exception):
    """Base class of every error recoverkit raises."""


class CheckpointNotFoundError(RecoverkitError, FileNotFoundError):
    """No checkpoint (or no such step) exists where one was asked for."""


class IntegrityError(RecoverkitError, ValueError):
    """Bytes read back do not match their checksum, or a file is truncated or malformed.

    Attributes:
        path: the file that is damaged, when known.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class IncompatibleCheckpointError(RecoverkitError, ValueError):
    """A checkpoint is valid but does not fit what it is being restored into
    (a foreign format, a newer format version, a missing key, a shape or dtype mismatch)."""


class CheckpointLockedError(RecoverkitError, BlockingIOError):
    """Another live writer holds the run lock on this checkpoint root."""


class EncodeError(RecoverkitError, TypeError):
    """A value in the state cannot be encoded without pickle (names the path and type)."""


class PickleNotAllowedError(RecoverkitError, PermissionError):
    """A checkpoint holds pickled objects and ``allow_pickle=True`` was not given on load."""


class PoolExhaustedError(RecoverkitError, MemoryError):
    """The staging pool has no free range large enough for a request."""


class CopyError(RecoverkitError, RuntimeError):
    """A copy submitted to the copy engine failed."""


class StorageError(RecoverkitError, OSError):
    """A storage operation failed; ``errno`` and ``filename`` are set when the OS gave them."""


class ConfigError(RecoverkitError, ValueError):
    """An option is invalid; the message names the option and the allowed values."""


class CommitError(RecoverkitError, RuntimeError):
    """A checkpoint could not be committed; the previous committed step is untouched.

    Attributes:
        step: the step whose commit failed.
        failures: rank -> description, for every rank that reported a failure.
    """

    def __init__(
        self, message: str, *, step: int | None = None, failures: Mapping[int, str] | None = None
    ) -> None:
        self.step = step
        self.failures = dict(failures or {})
        if self.failures:
            detail = "; ".join(f"rank {r}: {why}" for r, why in sorted(self.failures.items()))
            message = f"{message} ({detail})"
        super().__init__(message)


class CommitTimeoutError(CommitError, TimeoutError):
    """A rank did not report within the commit timeout (dead or stuck)."""


class RankFailure(RecoverkitError, RuntimeError):
    """One or more ranks failed; ``failures`` maps each rank to what went wrong."""

    def __init__(self, message: str, *, failures: Mapping[int, str]) -> None:
        self.failures = dict(failures)
        detail = "; ".join(f"rank {r}: {why}" for r, why in sorted(self.failures.items()))
        super().__init__(f"{message} ({detail})")


class TransportError(RecoverkitError, ConnectionError):
    """A transfer with ``peer`` failed (refused, or the transport is broken)."""

    def __init__(self, message: str, *, peer: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer


class PeerLostError(TransportError):
    """``peer`` closed its connection mid-transfer (its process died)."""


class PeerTimeoutError(TransportError, TimeoutError):
    """``peer`` did not take part in a transfer within the timeout (dead or stuck)."""


class RegroupError(RecoverkitError, RuntimeError):
    """The survivors of a lost rank could not re-form the process group in process.

    The caller falls back to the restart path (end the process; torchrun restarts the
    workers, which restore from memory). ``reason`` says why: ``"store_lost"`` (the store the
    workers share is gone: the node hosting it was the lost one), ``"excluded"`` (this
    process joined after the others had agreed without it), ``"timeout"`` (no agreement or no
    new group within the timeout), ``"invalid"`` (the store held a malformed record) or
    ``"diverged"`` (the survivors' positions cannot be reconciled,
    :func:`~recoverkit.elastic.reconcile.reconcile`: their completed steps differ by more than
    one, their membership generations differ, the ranks ahead disagree on the data position,
    or a rank could not apply the state it received; raised on every rank alike) or
    ``"restore"`` (a sharded model's survivors could not restore one step from memory at the
    new world size, :class:`~recoverkit.elastic.reshard.Reshard`; raised on every rank alike,
    the snapshots kept for the restart path).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def store_lost(self) -> bool:
        """True when in-process re-forming is impossible because the shared store is gone."""
        return self.reason == "store_lost"


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` (Python 3.11+), also on 3.10 where tracebacks do not show it."""
    error.__notes__ = [*getattr(error, "__notes__", ()), note]  # type: ignore[attr-defined]
