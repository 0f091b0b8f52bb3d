"""A training job under recoverkit.protect, run as a subprocess by the tests.

python -m tests.integrations.protect_worker ROOT STEPS SAVE_EVERY [NAN_AT [DIE_AT]]
(DIE_AT: SIGKILL itself after that step on a torchrun first attempt)
Prints one JSON line per event: {"event": "start", "resumed": ...}, {"event": "step", ...},
{"event": "done", "fingerprint": ...}.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import recoverkit
from recoverkit.cli.demo_train import VOCAB, TinyTransformer, fingerprint


class Tokens(Dataset):
    """Deterministic token sequences; sample `nan_at` (if any) poisons the loss."""

    def __init__(self, n: int = 96) -> None:
        g = torch.Generator().manual_seed(123)
        self.data = torch.randint(0, VOCAB, (n, 13), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def main(root: str, steps: int, save_every: int, nan_at: int = -1, die_at: int = -1) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    loader = DataLoader(Tokens(), batch_size=8, shuffle=True, num_workers=2)
    with recoverkit.protect(root, model=model, optimizer=opt, scheduler=sched, loader=loader,
                            save_every=save_every, epochs=None, max_steps=steps, grace_s=20) as run:
        print(json.dumps({"event": "start", "resumed": run.resumed_from}), flush=True)
        for batch in run:
            model.train()
            loss = nn.functional.cross_entropy(model(batch[:, :-1]).reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
            if run.step == nan_at and not getattr(main, "poisoned", False):
                main.poisoned = True  # type: ignore[attr-defined]
                loss = loss * float("nan")
            if not run.guard(loss):
                print(json.dumps({"event": "rejected", "step": run.step}), flush=True)
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            print(json.dumps({"event": "step", "step": run.step + 1, "first": batch[0, :3].tolist()}), flush=True)
            if run.step + 1 == die_at and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
                os.kill(os.getpid(), signal.SIGKILL)  # a crash on the first attempt only
    print(json.dumps({"event": "done", "step": run.step, "fingerprint": fingerprint(model), "skip": run.counters.skip}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *(int(a) for a in sys.argv[4:]))
