"""Damaged checkpoints are detected, skipped with a warning, and the previous step is used."""

from __future__ import annotations

import json
import os

import pytest
import torch

from recoverkit import Checkpointer, IncompatibleCheckpointError, IntegrityError
from recoverkit.format.manifest import Manifest
from recoverkit.storage.discovery import CheckpointSkippedWarning


def _save_two(root):
    model = torch.nn.Linear(64, 64)
    with Checkpointer(root) as ckpt:
        ckpt.save(1, {"model": model})
        at_step_1 = model.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        ckpt.save(2, {"model": model})
    return at_step_1


def _seg(root, step=2):
    return os.path.join(root, f"step-{step:09d}", "rank-00000.seg")


def _manifest(root, step=2):
    return os.path.join(root, f"step-{step:09d}", "manifest.json")


def _restore(root, step=None):
    target = {"model": torch.nn.Linear(64, 64)}
    with Checkpointer(root) as ckpt:
        got = ckpt.restore(target, step=step)
    return got, target["model"]


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _weight_offset(root, step=2):
    with open(_manifest(root, step), "rb") as f:  # packed or not: where its bytes are
        return Manifest.from_bytes(f.read()).tensors["model/weight"].shards[0].offset


def test_flipped_data_byte_falls_back_to_previous_step(root):
    saved = _save_two(root)
    _flip(_seg(root), _weight_offset(root) + 123)
    with pytest.warns(CheckpointSkippedWarning, match=r"step-000000002.*crc|checksum"):
        step, model = _restore(root)
    assert step == 1
    assert torch.equal(model.weight, saved)
    with pytest.raises(IntegrityError, match="rank-00000.seg"):
        _restore(root, step=2)  # asked for explicitly: the fault is raised, not skipped


def test_flipped_object_blob_byte_is_detected(root):
    _save_two(root)
    _flip(_seg(root), 5)  # inside the encoded object tree at offset 0
    with pytest.warns(CheckpointSkippedWarning):
        step, _ = _restore(root)
    assert step == 1


def test_truncated_segment_is_skipped(root):
    _save_two(root)
    size = os.path.getsize(_seg(root))
    os.truncate(_seg(root), size - 100)
    with pytest.warns(CheckpointSkippedWarning, match="size"):
        step, _ = _restore(root)
    assert step == 1


def test_missing_segment_is_skipped(root):
    _save_two(root)
    os.unlink(_seg(root))
    with pytest.warns(CheckpointSkippedWarning, match="missing"):
        step, _ = _restore(root)
    assert step == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_corrupt_manifest_is_skipped(root, damage):
    _save_two(root)
    path = _manifest(root)
    data = open(path, "rb").read()
    if damage == "flip":
        i = data.index(b'"step"') + 10
        data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = os.urandom(len(data))
    else:
        data = b""
    open(path, "wb").write(data)
    with pytest.warns(CheckpointSkippedWarning, match="manifest|JSON"):
        step, _ = _restore(root)
    assert step == 1
    with Checkpointer(root) as ckpt:
        with pytest.warns(CheckpointSkippedWarning):
            assert ckpt.latest() == 1


def test_foreign_manifest_is_incompatible(root):
    _save_two(root)
    open(_manifest(root), "w").write(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(IncompatibleCheckpointError, match="not a recoverkit manifest"):
        _restore(root, step=2)


def test_leftover_temporary_directory_is_never_selected_and_cleaned(root):
    _save_two(root)
    tmp = os.path.join(root, ".tmp-step-000000003-deadbeef")
    os.makedirs(tmp)
    open(os.path.join(tmp, "rank-00000.seg"), "wb").write(b"partial")
    junk = os.path.join(root, "step-000000009")  # a step directory without a manifest
    os.makedirs(junk)
    with Checkpointer(root) as ckpt:
        assert ckpt.steps() == [1, 2]
        assert ckpt.latest() == 2
    assert not os.path.exists(tmp)  # the writer cleans interrupted saves at start-up


def test_foreign_files_in_root_are_ignored(root):
    _save_two(root)
    open(os.path.join(root, "notes.txt"), "w").write("hello")
    os.makedirs(os.path.join(root, "step-abc"))
    step, _ = _restore(root)
    assert step == 2
