"""recoverkit: checkpointing and fault recovery for PyTorch training.

Example:
    >>> import tempfile, torch, recoverkit
    >>> model = torch.nn.Linear(4, 4)
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> with recoverkit.Checkpointer(tempfile.mkdtemp()) as ckpt:
    ...     _ = ckpt.save(10, {"model": model, "optimizer": opt})
    ...     ckpt.restore({"model": model, "optimizer": opt})
    10

The public names are loaded on first use (PEP 562): ``import recoverkit`` and the
``recoverkit`` command start without importing torch, which takes about a second; the
first use of a name that needs torch imports it then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_names

if TYPE_CHECKING:
    from .checkpointer import Checkpointer, SaveResult
    from .config import (
        CheckpointOptions,
        ProtectOptions,
        RetentionPolicy,
        StagingPolicy,
        TierPolicy,
        TierSpec,
    )
    from .elastic import ElasticOptions, ElasticTrainer
    from .errors import (
        CheckpointLockedError,
        CheckpointNotFoundError,
        CommitError,
        ConfigError,
        IncompatibleCheckpointError,
        IntegrityError,
        RecoverkitError,
    )
    from .reading import CheckpointReader
    from .session import protect
    from .staging.handle import SaveHandle
    from .state.global_batch import GlobalBatchLoader, GlobalBatchSampler
    from .state.keyed_rng import keyed_generator, keyed_rng, keyed_seed
    from .state.sampler import ResumableSampler
    from .state.sharded import ShardedTensor, replicated
    from .state.stateful import Stateful

__all__ = [
    "protect",
    "Checkpointer",
    "CheckpointReader",
    "SaveResult",
    "SaveHandle",
    "CheckpointOptions",
    "RetentionPolicy",
    "TierPolicy",
    "TierSpec",
    "StagingPolicy",
    "ProtectOptions",
    "ShardedTensor",
    "replicated",
    "Stateful",
    "ResumableSampler",
    "GlobalBatchSampler",
    "GlobalBatchLoader",
    "keyed_rng",
    "keyed_seed",
    "keyed_generator",
    "ElasticTrainer",
    "ElasticOptions",
    "RecoverkitError",
    "CheckpointNotFoundError",
    "IntegrityError",
    "IncompatibleCheckpointError",
    "CheckpointLockedError",
    "CommitError",
    "ConfigError",
]

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_WHERE = {
    "protect": ".session",
    "Checkpointer": ".checkpointer",
    "SaveResult": ".checkpointer",
    "CheckpointReader": ".reading",
    "SaveHandle": ".staging.handle",
    "CheckpointOptions": ".config",
    "RetentionPolicy": ".config",
    "TierPolicy": ".config",
    "TierSpec": ".config",
    "StagingPolicy": ".config",
    "ProtectOptions": ".config",
    "ShardedTensor": ".state.sharded",
    "replicated": ".state.sharded",
    "Stateful": ".state.stateful",
    "ResumableSampler": ".state.sampler",
    "GlobalBatchSampler": ".state.global_batch",
    "GlobalBatchLoader": ".state.global_batch",
    "keyed_rng": ".state.keyed_rng",
    "keyed_seed": ".state.keyed_rng",
    "keyed_generator": ".state.keyed_rng",
    "ElasticTrainer": ".elastic",
    "ElasticOptions": ".elastic",
    "RecoverkitError": ".errors",
    "CheckpointNotFoundError": ".errors",
    "IntegrityError": ".errors",
    "IncompatibleCheckpointError": ".errors",
    "CheckpointLockedError": ".errors",
    "CommitError": ".errors",
    "ConfigError": ".errors",
}


__getattr__, __dir__ = lazy_names(globals(), _WHERE)
