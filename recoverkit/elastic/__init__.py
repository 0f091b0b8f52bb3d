"""Training on after a lost rank, in process (issue 13, ElasWave).

The survivors re-form the default group (:mod:`recoverkit.distributed.regroup`), agree on
the last completed step (:mod:`.reconcile`) and redo the step with the lost rank's micro-
batches moved to them, the global batch, the gradient scale and every micro-batch's random
stream kept (:mod:`.trainer`). ``ElasticOptions(mode="shrink")`` is TorchFT's behaviour
(the lost share dropped), for comparison. A sharded (FSDP2) model is rebuilt on the new
group and restored from the newest step complete in memory, resharded (:mod:`.reshard`,
:mod:`.sharded`). A pipeline whose stage is lost is recovered by a spare that rebuilds the
stage from a surviving replica, or by CheckFree from its neighbours (:mod:`.pipeline`);
one that neither can rebuild rolls every stage back to its checkpoints in process
(:mod:`.stage_checkpoints`).
A process started outside torchrun grows the job back in process: :func:`join` in the
job's store, admitted by the members at a step boundary, the state sent to it in pieces
(:mod:`.admit`, :mod:`.grow`).

Example::

    trainer = ElasticTrainer(model, opt, sampler, loss_fn, store=store,
                             membership=Membership.initial(store), seed=0)
    while sampler.epoch < epochs:
        trainer.step()
"""

from __future__ import annotations

from typing import Any

from .admit import join
from .grow import Grow
from .options import ElasticOptions, ReduceMode
from .reconcile import Reconciled, reconcile
from .trainer import ElasticTrainer, LossFn, Recovery, StepResult

#: name -> submodule, imported on first use (the pipeline imports torch's pipelining engine)
_LAZY = {
    "Rebuilt": "reshard",
    "Reshard": "reshard",
    "Resharded": "reshard",
    "ShardedSync": "sharded",
    "fsdp_wrap": "sharded",
    "ZeroOptimizer": "zero",
    "StagePipeline": "pipeline",
    "PipelineOptions": "pipeline_options",
    "PipelineRecoveryError": "pipeline_options",
    "StageRecovery": "pipeline_options",
    "StepRecord": "pipeline_options",
    "StageCheckpoints": "stage_checkpoints",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ElasticTrainer",
    "ElasticOptions",
    "ReduceMode",
    "StepResult",
    "Recovery",
    "Reconciled",
    "reconcile",
    "LossFn",
    "join",
    "Grow",
    *_LAZY,
]
