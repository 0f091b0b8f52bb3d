"""Frozen, typed options.

Every option a user can set lives here, as a keyword-only frozen dataclass whose
``__post_init__`` says exactly what is wrong with a bad value. Units are in the names
(``timeout_s``, ``budget_bytes``). Nothing here does I/O; the layers below read these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

__all__ = ["RetentionPolicy", "CheckpointOptions"]


def _positive(name: str, value: float | int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """Which committed steps to keep.

    A step is kept if it is among the newest ``keep_last`` committed steps, or if
    ``keep_every`` is set and ``step % keep_every == 0``. The newest committed step is
    always kept, whatever the policy says.

    Example:
        >>> RetentionPolicy(keep_last=2, keep_every=1000).keeps(step=3000, rank_from_newest=5)
        True
    """

    keep_last: int | None = 3
    keep_every: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and (not isinstance(self.keep_last, int) or self.keep_last < 1):
            raise ConfigError(f"keep_last must be an integer >= 1 or None, got {self.keep_last!r}")
        if self.keep_every is not None and (
            not isinstance(self.keep_every, int) or self.keep_every < 1
        ):
            raise ConfigError(f"keep_every must be an integer >= 1 or None, got {self.keep_every!r}")

    def keeps(self, *, step: int, rank_from_newest: int) -> bool:
        """Whether ``step`` is kept; ``rank_from_newest`` is 0 for the newest committed step."""
        if rank_from_newest == 0:
            return True
        if self.keep_last is None or rank_from_newest < self.keep_last:
            return True
        return self.keep_every is not None and step % self.keep_every == 0


@dataclass(frozen=True, kw_only=True)
class CheckpointOptions:
    """How a :class:`~recoverkit.Checkpointer` saves and restores.

    Attributes:
        allow_pickle: encode objects that have no pickle-free encoding with pickle, and
            accept such checkpoints on load. Off by default: loading never runs code.
        capture_rng: save and restore Python, NumPy, torch CPU and CUDA random states.
        retention: which committed steps survive garbage collection after each commit.
        lock: hold a run lock on the root so a second writer fails fast.
        direct_io: write segment files with O_DIRECT where the file system allows it.
        io_threads: threads of the copy engine that checksums and stages tensors.
        commit_timeout_s: how long the commit waits for every rank before it fails.
        verify_on_restore: verify every byte's checksum on restore (never turn off for
            untrusted checkpoints).
    """

    allow_pickle: bool = False
    capture_rng: bool = True
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    lock: bool = True
    direct_io: bool = False
    io_threads: int = 2
    commit_timeout_s: float = 300.0
    verify_on_restore: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.retention, RetentionPolicy):
            raise ConfigError(f"retention must be a RetentionPolicy, got {type(self.retention).__name__}")
        if not isinstance(self.io_threads, int) or isinstance(self.io_threads, bool) or self.io_threads < 1:
            raise ConfigError(f"io_threads must be an integer >= 1, got {self.io_threads!r}")
        _positive("commit_timeout_s", self.commit_timeout_s)
