"""`recoverkit restore`: torch, safetensors, DCP and resharded recoverkit outputs load back exactly."""

from __future__ import annotations

import json
import os
import warnings
import zipfile

import torch

from tests.cli.helpers import cli, cli_json, train_and_save
from tests.distributed.harness import run_world
from tests.models import Trainer

ROWS, COLS = 37, 6


def _equal_model(sd: dict, trainer: Trainer) -> bool:
    ref = trainer.model.state_dict()
    return set(sd) >= set(ref) and all(torch.equal(sd[k], v) for k, v in ref.items())


def test_torch_format_loads_with_weights_only(tmp_path):
    root, out = str(tmp_path / "ckpt"), str(tmp_path / "full.pt")
    trainer = train_and_save(root)
    doc = cli_json("restore", root, "--to", out, "--format", "torch")
    assert doc["step"] == 3 and doc["format"] == "torch"
    sd = torch.load(out, weights_only=True)
    assert _equal_model(sd["model"], trainer)
    assert sd["step"] == 3
    assert sd["model"]["head.weight"].untyped_storage().data_ptr() == sd["model"]["embed.weight"].untyped_storage().data_ptr()
    ref_opt = trainer.optimizer.state_dict()
    for pid, st in ref_opt["state"].items():
        for k, v in st.items():
            assert torch.equal(sd["optimizer"]["state"][pid][k], v), (pid, k)
    assert sd["optimizer"]["param_groups"][0]["betas"] == ref_opt["param_groups"][0]["betas"]
    assert zipfile.ZipFile(out).testzip() is None  # every record's zip CRC matches its bytes
    # --select gives the entry's own state dict, ready for load_state_dict
    model_only = str(tmp_path / "model.pt")
    assert cli("restore", root, "--step", "2", "--to", model_only, "--format", "torch", "--select", "model").returncode == 0
    fresh = Trainer(seed=99)
    fresh.model.load_state_dict(torch.load(model_only, weights_only=True))
    assert not _equal_model(fresh.model.state_dict(), trainer)  # step 2, not 3
    assert fresh.model.head.weight is fresh.model.embed.weight


def test_safetensors_format_loads_with_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    root, out = str(tmp_path / "ckpt"), str(tmp_path / "model.safetensors")
    trainer = train_and_save(root)
    p = cli("restore", root, "--to", out, "--format", "safetensors", "--select", "model")
    assert p.returncode == 0, p.stderr
    loaded = load_file(out)
    ref = trainer.model.state_dict()
    assert "head.weight" not in loaded  # tied to embed.weight: stored once
    assert all(torch.equal(loaded[k], v) for k, v in ref.items() if k != "head.weight")
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["recoverkit.aliases"]) == {"head.weight": "embed.weight"}
    fresh = Trainer(seed=99)
    missing, unexpected = fresh.model.load_state_dict(loaded, strict=False)
    assert missing == ["head.weight"] and not unexpected
    assert _equal_model(fresh.model.state_dict(), trainer)


def test_dcp_format_loads_in_one_process_without_a_process_group(tmp_path):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root, out = str(tmp_path / "ckpt"), str(tmp_path / "dcp")
    trainer = train_and_save(root)
    assert cli("restore", root, "--to", out, "--format", "dcp").returncode == 0
    assert not dist.is_initialized()
    # one data file for the one rank, as torch's own FileSystemWriter(single_file_per_rank=True)
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp"]
    fresh = Trainer(seed=99)
    state = {"model": fresh.model.state_dict(),
             "optimizer": {"state": {0: {"exp_avg": torch.zeros_like(trainer.optimizer.state_dict()["state"][0]["exp_avg"])}}},
             "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=out)
    assert _equal_model(fresh.model.state_dict(), trainer)
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], trainer.optimizer.state_dict()["state"][0]["exp_avg"])
    assert state["step"] == 3


# ----------------------------------------------------------------- resharding in real worlds
def _full() -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float64).reshape(ROWS, COLS) * 1.5


def _bounds(world: int, rank: int) -> tuple[int, int]:
    per = -(-ROWS // world)
    lo = min(ROWS, rank * per)
    return lo, min(ROWS, lo + per)


def _save_sharded(rank, world, root):
    from recoverkit import Checkpointer
    from recoverkit.state.sharded import ShardedTensor

    lo, hi = _bounds(world, rank)
    flat = torch.arange(100, dtype=torch.bfloat16)
    flo, fhi = rank * 100 // world, (rank + 1) * 100 // world
    with Checkpointer(root) as ckpt:
        ckpt.save(4, {"w": ShardedTensor(_full()[lo:hi].clone(), (ROWS, COLS), (lo, 0)),
                      "opt": {"flat": ShardedTensor(flat[flo:fhi].clone(), (100,), (flo,))},
                      "note": f"rank {rank}", "local": torch.full((3,), float(rank))})
    return True


def _restore_sharded(rank, world, root):
    from recoverkit import Checkpointer
    from recoverkit.state.sharded import ShardedTensor

    lo, hi = _bounds(world, rank)
    flo, fhi = rank * 100 // world, (rank + 1) * 100 // world
    state = {"w": ShardedTensor(torch.zeros(hi - lo, COLS, dtype=torch.float64), (ROWS, COLS), (lo, 0)),
             "opt": {"flat": ShardedTensor(torch.zeros(fhi - flo, dtype=torch.bfloat16), (100,), (flo,))},
             "note": None, "local": torch.zeros(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the resharded step has every rank: no fallback warning
        with Checkpointer(root) as ckpt:
            assert ckpt.restore(state) == 4
    assert torch.equal(state["w"].local, _full()[lo:hi]), rank
    assert torch.equal(state["opt"]["flat"].local, torch.arange(100, dtype=torch.bfloat16)[flo:fhi])
    return state["note"], state["local"].tolist()


def test_resharded_restore_is_bit_exact_in_a_gloo_world(tmp_path):
    src, out = str(tmp_path / "saved2"), str(tmp_path / "for3")
    run_world(2, _save_sharded, src)
    doc = cli_json("restore", src, "--to", out, "--world-size", "3")
    assert doc["format"] == "recoverkit"
    step_dir = os.path.join(out, "step-000000004")
    assert sorted(f for f in os.listdir(step_dir) if f.endswith(".seg")) == [f"rank-0000{r}.seg" for r in range(3)]
    inspect = cli_json("inspect", step_dir)
    assert inspect["world_size"] == 3
    w = inspect["tensors"]["w"]["shards"]
    assert [(s["rank"], s["offsets"], s["shape"]) for s in w] == [(0, [0, 0], [13, 6]), (1, [13, 0], [13, 6]),
                                                                    (2, [26, 0], [11, 6])]
    assert cli("verify", out).returncode == 0
    results = run_world(3, _restore_sharded, out)
    # ranks 0 and 1 keep their own rank-local state; the new rank 2 gets rank 0's
    assert results == [("rank 0", [0.0] * 3), ("rank 1", [1.0] * 3), ("rank 0", [0.0] * 3)]


def test_resharded_to_one_rank_restores_in_process(tmp_path):
    from recoverkit import Checkpointer
    from recoverkit.state.sharded import ShardedTensor

    src, out = str(tmp_path / "saved2"), str(tmp_path / "for1")
    run_world(2, _save_sharded, src)
    assert cli("restore", src, "--to", out, "--world-size", "1").returncode == 0
    state = {"w": torch.zeros(ROWS, COLS, dtype=torch.float64),
             "opt": {"flat": ShardedTensor(torch.zeros(100, dtype=torch.bfloat16), (100,), (0,))},
             "note": None, "local": torch.zeros(3)}
    with Checkpointer(out) as ckpt:
        assert ckpt.manifest(4).world_size == 1
        assert ckpt.restore(state) == 4
    assert torch.equal(state["w"], _full()) and state["note"] == "rank 0"
    assert torch.equal(state["opt"]["flat"].local, torch.arange(100, dtype=torch.bfloat16))


def test_every_tensor_format_refuses_what_it_cannot_hold_before_writing(tmp_path):
    """The one export preamble: a dtype the format cannot hold is refused, naming the tensor,
    before any output exists; a tied tensor is stored once; dcp needs a mapping at the top."""
    import pytest

    from recoverkit import Checkpointer
    from recoverkit.errors import IncompatibleCheckpointError
    from recoverkit.reading import CheckpointReader
    from recoverkit.restore.export import Source, export

    root = str(tmp_path / "ckpt")
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with Checkpointer(root) as ckpt:
        ckpt.save(1, {"model": {"w": w, "tied": w, "odd": torch.zeros(5, dtype=torch.uint8).view(torch.uint3)}, "plain": [w]})
    tier = CheckpointReader(root).tiers[0]
    src = Source(tier, 1, tier.manifest(1))
    for fmt, words in (("torch", "a torch file cannot hold"), ("safetensors", "safetensors cannot hold")):
        out = str(tmp_path / f"out.{fmt}")
        with pytest.raises(IncompatibleCheckpointError, match=rf"'model/odd' has dtype uint3, which {words}"):
            export(src, out, fmt, select="model")
        assert not [n for n in os.listdir(tmp_path) if n.startswith(f"out.{fmt}")]  # nothing written
    with pytest.raises(IncompatibleCheckpointError, match="--format dcp needs a mapping at the top; plain is a list"):
        export(src, str(tmp_path / "dcp"), "dcp", select="plain")
    out = str(tmp_path / "w.safetensors")
    result = export(src, out, "safetensors", select="plain")  # the list's one tensor
    assert result.tensors == 1
    sd = torch.load(export(src, str(tmp_path / "w.pt"), "torch", select="plain").path, weights_only=True)
    assert torch.equal(sd[0], w)
