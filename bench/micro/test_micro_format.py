"""Manifest encode/decode (with its self-checksum) and the pickle-free typed-JSON codec.

Sizes are those of a real state: a manifest of 1,000 tensors of 4 shards each (a 4-rank
sharded model), and the object skeleton of an AdamW state dict over 1,000 parameters. There is
no external reference to compare with; these guard against regressions (``--benchmark-compare``).
"""

from __future__ import annotations

import pytest
import torch

from recoverkit.format.manifest import BlobRecord, Manifest, ShardRecord, TensorRecord
from recoverkit.state.codec import decode, encode
from recoverkit.state.flatten import TensorLeaf

N_TENSORS = 1000


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    tensors = {}
    for i in range(N_TENSORS):
        key = f"model.layers.{i // 10}.block.{i % 10}.weight"
        shards = tuple(
            ShardRecord(rank=r, file=f"rank-{r:05d}.seg", offset=(i * 4 + r) * 4096 * 64, nbytes=4096 * 64,
                        crc32c=(i * 2654435761 + r) & 0xFFFFFFFF, offsets=(r * 256, 0), shape=(256, 256))
            for r in range(4)
        )
        tensors[key] = TensorRecord(key=key, dtype="float32", shape=(1024, 256), shards=shards)
    blobs = tuple(BlobRecord(rank=r, file=f"rank-{r:05d}.seg", offset=0, nbytes=1000, crc32c=r) for r in range(4))
    return Manifest(step=1200, run_id="bench", world_size=4, tensors=tensors, blobs=blobs,
                    files={f"rank-{r:05d}.seg": 1 << 30 for r in range(4)})


@pytest.mark.benchmark(group="manifest")
def test_manifest_encode(benchmark, manifest):
    data = benchmark(manifest.to_bytes)
    assert len(data) > 100_000


@pytest.mark.benchmark(group="manifest")
def test_manifest_decode(benchmark, manifest):
    data = manifest.to_bytes()
    m = benchmark(Manifest.from_bytes, data)
    assert m.step == 1200 and len(m.tensors) == N_TENSORS


@pytest.fixture(scope="module")
def skeleton():
    state = {
        i: {"step": TensorLeaf(f"opt.state.{i}.step"), "exp_avg": TensorLeaf(f"opt.state.{i}.exp_avg"),
            "exp_avg_sq": TensorLeaf(f"opt.state.{i}.exp_avg_sq")}
        for i in range(N_TENSORS)
    }
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False,
               "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
               "fused": None, "params": list(range(N_TENSORS))}]
    return {"optimizer": {"state": state, "param_groups": groups}, "step": 1200, "dtype": torch.bfloat16,
            "rng": {"python": (3, tuple(range(625)), None), "seen": {1, 2, 3}}, "loss": float("nan")}


@pytest.mark.benchmark(group="codec")
def test_codec_encode(benchmark, skeleton):
    data = benchmark(encode, skeleton)
    assert data.startswith((b"{", b"\xfd7zXZ\x00"))  # JSON, xz-compressed from 64 KiB on


@pytest.mark.benchmark(group="codec")
def test_codec_decode(benchmark, skeleton):
    data = encode(skeleton)
    out = benchmark(decode, data)
    assert out["step"] == 1200 and len(out["optimizer"]["state"]) == N_TENSORS
