"""A small LLaMa-style decoder cut into pipeline stages, and its byte-level corpus.

Where it sits: the model and the data of ``bench_checkfree``'s one-process pipeline simulator
(nothing in ``recoverkit`` imports it). The flow: :func:`corpus` reads the Python standard
library's own sources (the ones that ship with this interpreter, a fixed sorted file list,
every tenth file held out) into two byte streams; :class:`Batches` cuts deterministic windows
from them (a batch depends only on the seed, the step and the micro-batch, so a job rolled
back to a checkpoint replays the same data); :func:`build_stages` makes ``L`` :class:`Stage`
modules, the first holding the token embedding and the last the final norm and output head,
each with the same blocks (RMSNorm, rotary attention, SwiGLU), so that the block states of
any two stages have the same keys and shapes (what CheckFree's averaging needs).

Names: a stage's state dict has ``blocks.*`` (every stage), ``embed.*`` (first stage only),
``norm.*`` and ``head.*`` (last stage only); :func:`block_state` is the ``blocks.*`` part.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ModelSpec",
    "Stage",
    "build_stages",
    "block_state",
    "edge_state",
    "Corpus",
    "corpus",
    "Batches",
]

VOCAB = 256  # bytes
#: directories of the standard library left out of the corpus (third-party code, test data)
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Sizes of the decoder: ``stages`` x ``layers_per_stage`` blocks of width ``dim``."""

    stages: int = 8
    layers_per_stage: int = 1
    dim: int = 128
    heads: int = 4
    ffn: int = 344  # about 8/3 * dim, as LLaMa
    seq_len: int = 128

    def __post_init__(self) -> None:
        if self.stages < 4:
            raise ValueError(f"ModelSpec.stages must be >= 4 (CheckFree+ pairs two edges), got {self.stages}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"ModelSpec: dim {self.dim} must split into {self.heads} heads of even size")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary embedding, ``(seq_len, head_dim / 2)`` each."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates pairs of ``x`` (batch, heads, seq, head_dim) by the position's angles."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


class Block(nn.Module):
    """Pre-norm decoder block: RMSNorm -> causal attention with rotary positions -> RMSNorm -> SwiGLU."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        d, self.heads = spec.dim, spec.heads
        self.attn_norm = RMSNorm(d)
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.ffn_norm = RMSNorm(d)
        self.w1 = nn.Linear(d, spec.ffn, bias=False)  # gate
        self.w3 = nn.Linear(d, spec.ffn, bias=False)  # up
        self.w2 = nn.Linear(spec.ffn, d, bias=False)  # down

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (w(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, d))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Stage(nn.Module):
    """One pipeline stage: ``layers_per_stage`` blocks, plus the embedding (first) or the final
    norm and output head (last).

    The simulator calls the pieces separately (:meth:`embed_tokens`, :meth:`run_blocks`,
    :meth:`logits`) because CheckFree+ runs one stage's blocks in another's slot.
    """

    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        self.index = index
        self.depth = spec.stages * spec.layers_per_stage
        self.first, self.last = index == 0, index == spec.stages - 1
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.layers_per_stage))
        if self.first:
            self.embed = nn.Embedding(VOCAB, spec.dim)
        if self.last:
            self.norm = RMSNorm(spec.dim)
            self.head = nn.Linear(spec.dim, VOCAB, bias=False)
        cos, sin = rotary_tables(spec.seq_len, spec.dim // spec.heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.reset(torch.Generator().manual_seed(0))

    @torch.no_grad()
    def reset(self, gen: torch.Generator) -> None:
        """(Re-)initialises every parameter from ``gen``: normal(0, 0.02), output projections
        scaled by 1/sqrt(2 * layers) as GPT-2, norms to one."""
        for name, p in sorted(self.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * self.depth) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        return self.embed(tokens)

    def run_blocks(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        return x

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x))


def build_stages(spec: ModelSpec, seed: int) -> list[Stage]:
    """``spec.stages`` stages, each initialised from its own generator (seed, stage index)."""
    stages = [Stage(spec, i) for i in range(spec.stages)]
    for i, s in enumerate(stages):
        s.reset(torch.Generator().manual_seed(seed * 1000 + i))
    return stages


def block_state(stage: Stage) -> dict[str, Tensor]:
    """The ``blocks.*`` entries of a stage's state dict (the same keys in every stage)."""
    return {k: v for k, v in stage.state_dict().items() if k.startswith("blocks.")}


def edge_state(stage: Stage) -> dict[str, Tensor]:
    """The (de)embedding entries of an edge stage: ``embed.*`` or ``norm.*`` and ``head.*``."""
    return {k: v for k, v in stage.state_dict().items() if not k.startswith("blocks.")}


# --------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class Corpus:
    """Two byte streams (training, held out) and where they came from."""

    train: Tensor  # uint8
    valid: Tensor  # uint8
    root: str
    files_train: int
    files_valid: int
    sha256: str


def corpus_files(root: str) -> list[str]:
    """Every ``*.py`` below ``root`` outside :data:`SKIP_DIRS`, relative, sorted (a fixed list)."""
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        for f in sorted(files):
            if f.endswith(".py"):
                out.append(os.path.normpath(os.path.join(rel, f)))
    return sorted(out)


def corpus(max_bytes: int, root: str | None = None, valid_every: int = 10) -> Corpus:
    """Reads the standard library's sources (``sysconfig.get_paths()["stdlib"]``) offline.

    Files are taken in sorted order until the training stream holds ``max_bytes``; file ``i``
    of that order goes to the held-out stream when ``i % valid_every == valid_every - 1``.
    Files are separated by a NUL byte. Never downloads anything.
    """
    root = root or sysconfig.get_paths()["stdlib"]
    names = corpus_files(root)
    if not names:
        raise FileNotFoundError(f"no Python sources under {root!r} to build the corpus from")
    train, valid, h = bytearray(), bytearray(), hashlib.sha256()
    nt = nv = 0
    for i, rel in enumerate(names):
        if len(train) >= max_bytes:
            break
        try:
            with open(os.path.join(root, rel), "rb") as f:
                data = f.read() + b"\0"
        except OSError:
            continue
        h.update(rel.encode() + b"\0" + data)
        if i % valid_every == valid_every - 1:
            valid += data
            nv += 1
        else:
            train += data
            nt += 1
    if len(valid) < 4096 or len(train) < 4096:
        raise ValueError(f"corpus from {root!r} too small: {len(train)} training, {len(valid)} held-out bytes")
    return Corpus(
        train=torch.frombuffer(bytes(train), dtype=torch.uint8).clone(),
        valid=torch.frombuffer(bytes(valid), dtype=torch.uint8).clone(),
        root=root, files_train=nt, files_valid=nv, sha256=h.hexdigest(),
    )


class Batches:
    """Deterministic windows: a micro-batch is a function of (seed, step, micro-batch index)."""

    def __init__(self, data: Corpus, seq_len: int, micro_batch: int, seed: int) -> None:
        self.data, self.seq_len, self.micro_batch, self.seed = data, seq_len, micro_batch, seed

    def train(self, step: int, micro: int) -> Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 64 + micro)
        hi = self.data.train.numel() - self.seq_len - 1
        starts = torch.randint(0, hi, (self.micro_batch,), generator=g)
        return torch.stack([self.data.train[s : s + self.seq_len + 1] for s in starts.tolist()]).long()

    def valid(self, windows: int) -> list[Tensor]:
        """``windows`` held-out windows evenly spaced over the held-out stream, in batches."""
        n = self.data.valid.numel() - self.seq_len - 1
        starts = [int(i * n / windows) for i in range(windows)]
        rows = [self.data.valid[s : s + self.seq_len + 1] for s in starts]
        return [torch.stack(rows[i : i + self.micro_batch]).long() for i in range(0, len(rows), self.micro_batch)]
