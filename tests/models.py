"""A small transformer and a training loop, for tests that resume training exactly."""

from __future__ import annotations

import torch
from torch import nn

from recoverkit.cli.demo_train import SEQ, VOCAB, GeneratorState, TinyTransformer

__all__ = ["SEQ", "VOCAB", "TinyTransformer", "Trainer", "params_equal"]


class Trainer:
    """Model, AdamW, a warm-up scheduler and a seeded data stream; one call = one step."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = TinyTransformer()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / 5))
        self.data = torch.Generator().manual_seed(seed + 1)
        self.step = 0

    def state(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "data": GeneratorState(self.data), "step": self.step}

    def train_step(self) -> float:
        self.model.train()
        tokens = torch.randint(0, VOCAB, (8, SEQ + 1), generator=self.data)
        logits = self.model(tokens[:, :-1])  # dropout draws from the global torch RNG
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(loss.detach())


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
