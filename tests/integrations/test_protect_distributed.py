"""protect() in 2-rank gloo worlds with DDP and FSDP2 modules: a run stopped part-way and
started again ends bit-identical to one that never stopped (data position, RNG, optimizer)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_world

TOTAL = 8


def _train(rank, world, root, wrap, max_steps):
    from torch.utils.data import DataLoader, TensorDataset

    import recoverkit

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Dropout(0.2), torch.nn.Linear(7, 3))
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net)
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(net[0])
        fully_shard(net[2])
        model = fully_shard(net)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    data = TensorDataset(torch.randn(64, 5, generator=torch.Generator().manual_seed(7)))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    torch.manual_seed(100 + rank)  # dropout differs per rank, and must resume per rank
    losses = {}
    with recoverkit.protect(root, model=model, optimizer=opt, loader=loader, save_every=2, epochs=None, max_steps=max_steps) as run:
        for (x,) in run:
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[run.step + 1] = loss.item()
        resumed = run.resumed_from
    sd = model.state_dict()
    final = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist() for k, v in sd.items()}
    return {"losses": losses, "final": final, "resumed": resumed}


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, wrap):
    straight = run_world(2, _train, str(tmp_path / "a"), wrap, TOTAL)
    part = run_world(2, _train, str(tmp_path / "b"), wrap, 5)
    rest = run_world(2, _train, str(tmp_path / "b"), wrap, TOTAL)
    for rank in range(2):
        assert part[rank]["resumed"] is None
        assert rest[rank]["resumed"] == 5  # the run's last step is saved when its loop ends
        assert sorted(rest[rank]["losses"]) == list(range(6, TOTAL + 1))
        for step, loss in rest[rank]["losses"].items():
            assert loss == straight[rank]["losses"][step], (wrap, rank, step)
        assert rest[rank]["final"] == straight[rank]["final"]
