"""Random streams keyed to the logical sample, not to the rank that happens to compute it.

Where it sits: in the training loop, around each micro-batch's forward pass. When the world
shrinks or grows, a micro-batch moves to another rank (see
:class:`~recoverkit.state.global_batch.GlobalBatchSampler`); for the run to compute what it
would have computed, every random number drawn for that micro-batch (dropout masks, noise,
augmentation) must come from a stream that depends on *which* micro-batch it is, never on
the rank's own stream, whose position depends on what that rank happened to run before.

The flow: ``keyed_seed(seed, *key)`` turns the run's seed and a logical key, typically
``(epoch, step, micro_batch_index)`` or a global sample index, into a 64-bit seed;
:func:`keyed_generator` builds a ``torch.Generator`` from it; :func:`keyed_rng` seeds torch's
*global* streams from it for the duration of a ``with`` block and puts the outer streams
back afterwards, so ``nn.Dropout`` and friends inside draw keyed numbers while the outer
training stream (and so every later draw of the loop) is untouched.

**What** :func:`keyed_rng` **covers**: torch's global CPU generator and the global generator
of each CUDA device it forks (default: the current device, when this process has already
initialized CUDA; pass ``devices=`` for more). Everything that draws from
those without a ``generator=`` argument is covered: ``nn.Dropout``, ``F.dropout``,
``torch.rand*``, ``torch.bernoulli``, ``torch.randperm``, ``Tensor.uniform_`` ...

**What it does not cover**: Python's ``random`` module, NumPy's global or ``Generator``
streams, ``torch.Generator`` objects the user created, other accelerators' generators,
and work done in other threads or processes (DataLoader workers) while the block runs.
Cover those with the same key: ``random.Random(keyed_seed(seed, *key))``,
``np.random.default_rng(keyed_seed(seed, *key))``, ``keyed_generator(seed, *key)`` passed
as ``generator=``. A dataset's per-sample augmentation belongs keyed to the sample index.

Same key, same numbers: on any rank, in any process, in any run, with any recoverkit
version (the derivation below is fixed), given the same torch version and device kind (the
generator's algorithm is torch's).

Example:
    >>> import torch
    >>> drop = torch.nn.Dropout(0.5)
    >>> x = torch.ones(8)
    >>> with keyed_rng(7, 0, 3):        # seed 7, step 0, micro-batch 3
    ...     a = drop(x)
    >>> with keyed_rng(7, 0, 3):
    ...     b = drop(x)
    >>> bool(torch.equal(a, b))
    True
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

__all__ = ["keyed_seed", "keyed_generator", "keyed_rng"]

#: blake2b personalization: changing it (or the encoding) changes every keyed stream
_PERSON = b"recoverkit.key.1"
_INT_MIN, _INT_END = -(1 << 127), 1 << 127  # a key part packs into 16 signed bytes
_TAG_INT, _TAG_STR = b"i", b"s"


def keyed_seed(seed: int, *key: int | str) -> int:
    """A 64-bit seed (``0 <= s < 2**64``) derived from ``seed`` and the logical ``key``.

    The derivation is fixed and documented, so it is stable across runs, processes, ranks,
    machines and recoverkit versions (it never uses Python's ``hash()``, which is salted
    per process): ``blake2b(digest_size=8, person=b"recoverkit.key.1")`` over the parts
    ``(seed, *key)``, each packed as a tag byte then ``b"i"`` + 16-byte little-endian
    signed integer, or ``b"s"`` + 8-byte little-endian length + UTF-8 bytes for a string;
    the digest read as a little-endian unsigned integer. Different keys (also keys of
    different lengths: ``(1, 2)`` and ``(1, 2, 0)``) give unrelated seeds.

    Args:
        seed: the run's base seed (any int within +-2**127).
        *key: ints (step, micro-batch or sample index ...; NumPy and torch integer
            scalars are accepted through ``__index__``) or strings (a stream's name,
            e.g. ``"dropout"``). ``bool`` is refused: ``True`` and ``1`` would collide.

    Raises:
        TypeError: a part is not an int or a str.
        ValueError: an int part is outside +-2**127.

    Example:
        >>> keyed_seed(0, 5, 2) == keyed_seed(0, 5, 2)
        True
        >>> keyed_seed(0, 5, 2) != keyed_seed(0, 2, 5)
        True
    """
    h = hashlib.blake2b(digest_size=8, person=_PERSON)
    for i, part in enumerate((seed, *key)):
        what = "seed" if i == 0 else f"key part {i - 1}"
        if isinstance(part, str):
            if i == 0:
                raise TypeError(f"keyed_seed: the seed must be an int, got a str {part[:40]!r}")
            raw = part.encode("utf-8")
            h.update(_TAG_STR + len(raw).to_bytes(8, "little") + raw)
            continue
        if isinstance(part, bool):
            raise TypeError(f"keyed_seed: {what} is a bool ({part}); pass an int")
        try:
            value = operator.index(part)
        except TypeError:
            raise TypeError(
                f"keyed_seed: {what} must be an int or a str, got {type(part).__name__}"
            ) from None
        if not _INT_MIN <= value < _INT_END:
            raise ValueError(f"keyed_seed: {what} = {value} is outside +-2**127")
        h.update(_TAG_INT + value.to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little")


def keyed_generator(
    seed: int, *key: int | str, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with :func:`keyed_seed`.

    Pass it as ``generator=`` where a draw must not touch (or depend on) a global stream,
    e.g. per-sample augmentation in a dataset: ``keyed_generator(seed, epoch, index)``.

    Example:
        >>> a = torch.rand(3, generator=keyed_generator(1, 4))
        >>> b = torch.rand(3, generator=keyed_generator(1, 4))
        >>> bool(torch.equal(a, b))
        True
    """
    return torch.Generator(device=device).manual_seed(keyed_seed(seed, *key))


def _cuda_devices(devices: Sequence[int | str | torch.device] | None) -> list[int]:
    if devices is not None:
        out = []
        for d in devices:
            dev = torch.device(d) if not isinstance(d, int) else torch.device("cuda", d)
            if dev.type != "cuda":
                raise ValueError(f"keyed_rng: devices lists CUDA devices only, got {d!r}")
            out.append(dev.index if dev.index is not None else torch.cuda.current_device())
        return sorted(set(out))
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []  # never create a CUDA context for a process that does not use CUDA
    return [torch.cuda.current_device()]


@contextmanager
def keyed_rng(
    seed: int, *key: int | str, devices: Sequence[int | str | torch.device] | None = None
) -> Iterator[int]:
    """Draw from torch's global streams seeded by ``(seed, *key)`` inside the block only.

    On entry the torch CPU generator and the generators of the CUDA ``devices`` (default:
    the current CUDA device if this process has initialized CUDA, else none: a CPU-only
    process on a GPU machine never gets a CUDA context from this) are saved
    (``torch.random.fork_rng``)
    and all of them are seeded with ``keyed_seed(seed, *key)``, the same seed on every
    device, so a micro-batch draws the same numbers whether it runs on ``cuda:0`` or
    ``cuda:3``. On exit (also on an exception) the saved states are put back: the outer
    stream continues exactly as if the block had not drawn anything. Yields the seed.

    Only torch's global CPU/CUDA generators are covered; see the module docstring for
    Python's ``random``, NumPy and user-created generators (use :func:`keyed_generator`).
    Blocks nest (the inner one restores the outer keyed stream).

    Args:
        seed: the run's base seed.
        *key: the logical key, e.g. ``(epoch, step, micro_batch_index)``.
        devices: CUDA devices to fork and seed (ints, ``"cuda:1"``, ``torch.device``);
            ``[]`` leaves CUDA alone. Name them when the block is the first CUDA work of
            the process, or when it draws on more than the current device.

    Example:
        >>> before = torch.get_rng_state()
        >>> with keyed_rng(3, 10, 0):
        ...     _ = torch.rand(4)
        >>> bool(torch.equal(before, torch.get_rng_state()))
        True
    """
    value = keyed_seed(seed, *key)
    cuda = _cuda_devices(devices)
    with torch.random.fork_rng(devices=cuda, enabled=True):
        torch.default_generator.manual_seed(value)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(value)
        yield value
