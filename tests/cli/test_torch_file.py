"""``--format torch`` writes the file ``torch.save`` writes, without torch: checked against
torch's own reader (``weights_only`` on and off, ``mmap``) and against ``torch.save`` itself."""

from __future__ import annotations

import io
import zipfile
from collections import OrderedDict

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions, ShardedTensor
from recoverkit.cli import main
from recoverkit.format.manifest import ShardRecord, TensorRecord
from recoverkit.restore.export.torch_zip import (
    ITEMSIZE,
    LEGACY_STORAGE,
    UNTYPED_STORAGE,
    TorchFile,
    torch_savable,
)
from recoverkit.restore.reader import read_raw
from recoverkit.state.dtypes import STORABLE_DTYPES, dtype_name, to_bytes_view
from tests.distributed.harness import run_world


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(to_bytes_view(t.contiguous()).numpy())


def _export(root: str, out: str, *extra: str) -> None:
    main(["restore", root, "--to", out, "--format", "torch", *extra], standalone_mode=False)


def test_dtype_tables_agree_with_this_torch():
    legacy = {
        _name(d): s
        for d, s in torch.storage._dtype_to_storage_type_map().items()
        if not _name(d).startswith(("q", "quint"))
    }
    assert LEGACY_STORAGE == legacy
    assert UNTYPED_STORAGE == {_name(d) for d in torch.storage._new_dtypes()}
    for name, size in ITEMSIZE.items():
        assert getattr(torch, name).itemsize == size, name


def _every_dtype(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One tensor of every dtype a checkpoint can hold, from random bytes (NaNs included)."""
    out = {}
    for dtype in STORABLE_DTYPES:
        raw = torch.randint(0, 256, (5, 3 * dtype.itemsize), dtype=torch.uint8, generator=gen)
        out[dtype_name(dtype)] = raw.view(dtype)
    return out


def test_every_dtype_shape_and_alias_loads_bit_exact_in_torch(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = {k: v for k, v in _every_dtype(gen).items() if torch_savable(k)}
    base = torch.rand(6, 4, generator=gen, dtype=torch.float64)
    sd = OrderedDict(
        weight=torch.nn.Parameter(torch.rand(3, 2, generator=gen)), bias=torch.zeros(2)
    )
    sd._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    state = {
        "t": tensors,
        "shapes": {"scalar": torch.tensor(-0.0), "empty": torch.empty(0, 4), "empty_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
                   "transposed": base.t(), "strided": base[::2, 1:], "wide": torch.rand(2, 3, 4, 5, generator=gen)},
        "model": sd,
        "tied": {"a": base, "b": base},
        "values": {"step": 7, "big": 2**80, "f": float("inf"), "s": "x", "b": b"\x00\x01", "t": (1, [2, None]), "size": torch.Size([2, 3]),
                   "dtype": torch.bfloat16, "device": torch.device("cpu")},
    }  # fmt: skip
    root, out = str(tmp_path / "ckpt"), str(tmp_path / "out.pt")
    with Checkpointer(root, options=CheckpointOptions(capture_rng=False)) as ckpt:
        ckpt.save(1, state)
    _export(root, out)
    # torch's own loader cannot make an empty float4 tensor under deterministic algorithms
    # (the suite's default): it fills new memory, which float4 does not implement
    torch.use_deterministic_algorithms(False)
    for weights_only, mmap in ((True, False), (False, False), (True, True)):
        got = torch.load(out, weights_only=weights_only, mmap=mmap)
        for group in ("t", "shapes", "tied"):
            for k, v in state[group].items():
                g = got[group][k]
                assert g.dtype == v.dtype and g.shape == v.shape and g.is_contiguous(), (group, k)
                assert _bytes(g) == _bytes(v), (group, k)
        assert got["tied"]["a"] is got["tied"]["b"]
        assert list(got["model"]) == ["weight", "bias"] and got["model"]._metadata == sd._metadata
        assert torch.equal(got["model"]["weight"], sd["weight"].detach())
        assert got["values"] == state["values"] and type(got["values"]["size"]) is torch.Size


def test_dtypes_torch_cannot_save_are_refused(tmp_path):
    refused = [d for d in STORABLE_DTYPES if not torch_savable(dtype_name(d))]
    assert refused, "this torch can save every storable dtype: drop this test"
    for dtype in refused:
        with pytest.raises((RuntimeError, KeyError)):  # torch.save itself refuses them
            torch.save(torch.zeros(3, dtype=torch.uint8).view(dtype), io.BytesIO())
    root = str(tmp_path / "ckpt")
    with Checkpointer(root) as ckpt:
        ckpt.save(1, {"w": torch.zeros(3, dtype=torch.uint8).view(refused[0])})
    p = _run(root, str(tmp_path / "x.pt"))
    assert (
        p.returncode == 4
        and dtype_name(refused[0]) in p.stderr
        and not (tmp_path / "x.pt").exists()
    )


def _run(root: str, out: str):  # type: ignore[no-untyped-def]
    from tests.cli.helpers import cli

    return cli("restore", root, "--to", out, "--format", "torch")


def _stubbed(node, plan, memo):  # type: ignore[no-untyped-def]
    if isinstance(node, torch.Tensor):
        if id(node) not in memo:
            memo[id(node)] = plan.tensor(_name(node.dtype), node.shape, source=node)
        return memo[id(node)]
    if isinstance(node, dict):
        out = type(node)((k, _stubbed(v, plan, memo)) for k, v in node.items())
        if hasattr(node, "_metadata"):
            out._metadata = node._metadata
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_stubbed(v, plan, memo) for v in node)
    return node


def _tree() -> dict:  # type: ignore[type-arg]
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    sd = OrderedDict(w=a, b=torch.tensor(2.5), t=a)
    sd._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    return {
        "m": sd,
        "x": [1, 2.0, "s", None, (True, b"b")],
        "u": torch.arange(3).to(torch.uint16),
        "f8": torch.zeros(2, dtype=torch.float8_e5m2),
    }


def test_same_records_and_pickle_as_torch_save():
    tree = _tree()
    ref = io.BytesIO()
    torch.save(tree, ref)
    plan, mine = TorchFile(), io.BytesIO()
    plan.write(mine, _stubbed(tree, plan, {}), read=_bytes)
    za, zb = zipfile.ZipFile(ref), zipfile.ZipFile(mine)
    layout = [
        [(i.filename, i.header_offset, i.file_size, i.flag_bits) for i in z.infolist()]
        for z in (za, zb)
    ]
    assert layout[0] == layout[1]
    for name in za.namelist():
        if not name.endswith("serialization_id"):
            assert za.read(name) == zb.read(name), name
    assert zb.testzip() is None


def test_zip64_records_load(tmp_path):
    tree = _tree()
    plan, buf = TorchFile(), io.BytesIO()
    plan.write(
        buf, _stubbed(tree, plan, {}), read=_bytes, zip64_limit=0
    )  # every record and offset as zip64
    path = tmp_path / "z64.pt"
    path.write_bytes(buf.getvalue())
    assert zipfile.ZipFile(path).testzip() is None
    for mmap in (False, True):
        got = torch.load(path, weights_only=True, mmap=mmap)
        assert (
            got["m"]["w"] is got["m"]["t"]
            and torch.equal(got["m"]["w"], tree["m"]["w"])
            and got["u"].dtype == torch.uint16
        )


def test_pieces_along_dim0_are_assembled_as_raw_bytes(tmp_path):
    gen = torch.Generator().manual_seed(1)
    w = torch.rand(64, 640, generator=gen)
    root, out = str(tmp_path / "ckpt"), str(tmp_path / "out.pt")
    with Checkpointer(root, options=CheckpointOptions(piece_bytes=4096 * 4)) as ckpt:
        ckpt.save(1, {"w": w})
        rec = ckpt.manifest(1).tensors["w"]
    assert len(rec.shards) > 1
    _export(root, out)
    assert torch.equal(torch.load(out, weights_only=True)["w"], w)


def test_other_layouts_are_left_to_the_torch_reader():
    shard = ShardRecord(
        rank=0, file="f", offset=0, nbytes=16, crc32c=0, offsets=(0, 0), shape=(2, 2)
    )
    other = ShardRecord(
        rank=1, file="g", offset=0, nbytes=16, crc32c=0, offsets=(0, 2), shape=(2, 2)
    )
    assert read_raw(None, 0, TensorRecord("k", "float32", (2, 4), (shard, other))) is None  # type: ignore[arg-type]


ROWS, COLS = 6, 8


def _save_cols(rank: int, world: int, root: str) -> None:
    full = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS)
    lo, hi = rank * COLS // world, (rank + 1) * COLS // world
    with Checkpointer(root) as ckpt:
        ckpt.save(2, {"w": ShardedTensor(full[:, lo:hi].clone(), (ROWS, COLS), (0, lo))})


def test_column_sharded_tensor_exports_whole(tmp_path):
    root, out = str(tmp_path / "ckpt"), str(tmp_path / "out.pt")
    run_world(2, _save_cols, root)
    _export(root, out)
    got = torch.load(out, weights_only=True)["w"]
    assert torch.equal(got, torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS))
