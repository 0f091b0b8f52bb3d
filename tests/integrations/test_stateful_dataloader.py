"""torchdata's StatefulDataLoader (shuffling, worker processes) as part of the saved state."""

from __future__ import annotations

import pytest
import torch

sdl = pytest.importorskip("torchdata.stateful_dataloader")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _loader() -> torch.utils.data.DataLoader:
    data = torch.utils.data.TensorDataset(torch.arange(40.0))
    return sdl.StatefulDataLoader(data, batch_size=4, shuffle=True, num_workers=2)


def _batches(it, n):
    return [next(it)[0].tolist() for _ in range(n)]


def test_checkpointer_resumes_a_stateful_dataloader_mid_epoch(tmp_path):
    from recoverkit import Checkpointer

    torch.manual_seed(0)
    dl = _loader()
    it = iter(dl)
    _batches(it, 3)
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(3, {"loader": dl})
        expected = _batches(it, 4)
        torch.manual_seed(123)  # a different global RNG: the order must come from the checkpoint
        fresh = _loader()
        assert ckpt.restore({"loader": fresh}) == 3
    assert _batches(iter(fresh), 4) == expected


def _run(root, max_steps):
    import recoverkit

    seen = []
    with recoverkit.protect(root, loader=_loader(), save_every=2, epochs=None, max_steps=max_steps) as run:
        for (x,) in run:
            seen.append(x.tolist())
    return seen


def test_protect_resumes_a_stateful_dataloader_across_epochs(tmp_path):
    torch.manual_seed(0)
    straight = _run(str(tmp_path / "a"), 14)  # 10 batches per epoch: crosses an epoch boundary
    torch.manual_seed(0)
    first = _run(str(tmp_path / "b"), 7)
    torch.manual_seed(99)
    rest = _run(str(tmp_path / "b"), 14)  # resumes from step 7 (its last step is saved at the end)
    assert first == straight[:7]
    assert rest == straight[7:]  # the stopped run saved its last step
