"""Training on after a lost rank, in process (issue 13, ElasWave).

The survivors re-form the default group (:mod:`recoverkit.distributed.regroup`), agree on
the last completed step (:mod:`.reconcile`) and redo the step with the lost rank's micro-
batches moved to them, the global batch, the gradient scale and every micro-batch's random
stream kept (:mod:`.trainer`). ``ElasticOptions(mode="shrink")`` is TorchFT's behaviour
(the lost share dropped), for comparison.

Example::

    trainer = ElasticTrainer(model, opt, sampler, loss_fn, store=store,
                             membership=Membership.initial(store), seed=0)
    while sampler.epoch < epochs:
        trainer.step()
"""

from __future__ import annotations

from .options import ElasticOptions, ReduceMode
from .reconcile import Reconciled, reconcile
from .trainer import ElasticTrainer, LossFn, Recovery, StepResult

__all__ = [
    "ElasticTrainer",
    "ElasticOptions",
    "ReduceMode",
    "StepResult",
    "Recovery",
    "Reconciled",
    "reconcile",
    "LossFn",
]
