"""The demo's training job: a small transformer on CPU, checkpointed every few steps.

Run as a worker process by ``recoverkit demo``; prints one JSON line per event so the
parent can kill it at a chosen step and build the timeline. On start it restores the
newest valid checkpoint, if any, and continues from there.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any

import torch
from torch import nn

from ..checkpointer import Checkpointer
from ..config import CheckpointOptions, StagingPolicy
from ..errors import CheckpointNotFoundError

VOCAB, SEQ = 61, 12


class TinyTransformer(nn.Module):
    """Embedding -> encoder layers with dropout -> tied output head."""

    def __init__(self, d_model: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(tokens))))


class GeneratorState:
    """A torch.Generator as a Stateful (the demo's data stream position)."""

    def __init__(self, gen: torch.Generator) -> None:
        self.gen = gen

    def state_dict(self) -> dict:
        return {"state": self.gen.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.gen.set_state(sd["state"])


def fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run(root: str, steps: int, save_every: int) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    data = torch.Generator().manual_seed(1)
    state: dict[str, Any] = {"model": model, "optimizer": opt, "scheduler": sched, "data": GeneratorState(data), "step": 0}
    t0 = time.perf_counter()
    with Checkpointer(root, options=CheckpointOptions(staging=StagingPolicy(budget_bytes=64 << 20))) as ckpt:
        try:
            restored = ckpt.restore(state)
            _emit(event="restored", step=restored, seconds=time.perf_counter() - t0)
        except CheckpointNotFoundError:
            _emit(event="fresh", step=0)
        step = state["step"]
        pending = None  # the last save_async: its stall is known once the next step ran
        while step < steps:
            model.train()
            tokens = torch.randint(0, VOCAB, (8, SEQ + 1), generator=data)
            loss = nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            stall = 0.0
            if pending is not None:  # call + the wait the optimizer's pre-step hook just did
                stall = pending.metrics["call_s"] + pending.metrics["prestep_wait_s"]
                pending = None
            if step % save_every == 0:
                state["step"] = step
                pending = ckpt.save_async(step, state)
            _emit(event="step", step=step, loss=float(loss.detach()), save_s=stall, t=time.perf_counter())
    _emit(event="done", step=step, fingerprint=fingerprint(model))


def _emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
