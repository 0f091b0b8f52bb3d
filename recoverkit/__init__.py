"""recoverkit: checkpointing and fault recovery for PyTorch training.

Example:
    >>> import tempfile, torch, recoverkit
    >>> model = torch.nn.Linear(4, 4)
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> with recoverkit.Checkpointer(tempfile.mkdtemp()) as ckpt:
    ...     _ = ckpt.save(10, {"model": model, "optimizer": opt})
    ...     ckpt.restore({"model": model, "optimizer": opt})
    10
"""

from .checkpointer import Checkpointer, SaveResult
from .config import CheckpointOptions, RetentionPolicy, StagingPolicy, TierPolicy
from .state.sharded import ShardedTensor, replicated
from .errors import (
    CheckpointLockedError,
    CheckpointNotFoundError,
    CommitError,
    IncompatibleCheckpointError,
    IntegrityError,
    RecoverkitError,
)
from .reading import CheckpointReader
from .session import protect
from .state import ResumableSampler, Stateful

__all__ = [
    "protect",
    "Checkpointer",
    "CheckpointReader",
    "SaveResult",
    "CheckpointOptions",
    "RetentionPolicy",
    "TierPolicy",
    "StagingPolicy",
    "ShardedTensor",
    "replicated",
    "Stateful",
    "ResumableSampler",
    "RecoverkitError",
    "CheckpointNotFoundError",
    "IntegrityError",
    "IncompatibleCheckpointError",
    "CheckpointLockedError",
    "CommitError",
]

__version__ = "0.1.0"
