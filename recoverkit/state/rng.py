"""The process's random streams as one Stateful: Python, NumPy, torch CPU and CUDA.

Save data flow: the planner adds an ``RNGState()`` entry to every save, so ``capture``
records the streams next to the model (as rank-local state in a multi-rank world). Restore:
the applier calls ``load_state_dict`` last, after everything else was applied, so that a
resumed run draws exactly the numbers the uninterrupted run would have drawn (invariant 7).

The captured tree holds only codec-friendly values: Python's state is a tuple of ints, the
NumPy state is the legacy ``('MT19937', uint32 array, pos, has_gauss, cached_gaussian)``
tuple, and the torch states are uint8 tensors (which ``flatten`` moves to the tensor data).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import IncompatibleCheckpointError

__all__ = ["RNGState"]

_KEYS = {"python", "numpy", "torch", "cuda"}


class RNGState:
    """The global random number generators of this process, saved and restored together.

    ``state_dict()`` reads ``random.getstate()``, ``np.random.get_state()``,
    ``torch.get_rng_state()`` and, when CUDA is available, one generator state per CUDA
    device. ``load_state_dict`` sets them all back. CUDA states are restored for as many
    devices as both the checkpoint and this process have; when the counts differ (or CUDA
    is missing here), the rest is skipped with a warning.

    Example:
        >>> rng = RNGState()
        >>> saved = rng.state_dict()
        >>> a = (random.random(), float(np.random.rand()), torch.rand(1).item())
        >>> rng.load_state_dict(saved)
        >>> a == (random.random(), float(np.random.rand()), torch.rand(1).item())
        True
    """

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of every stream (the torch states are fresh tensors, not views)."""
        cuda: list[torch.Tensor] = []
        if torch.cuda.is_available():
            cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(legacy=True),
            "torch": torch.get_rng_state(),
            "cuda": cuda,
        }

    def validate_state_dict(self, state_dict: Any) -> None:
        """Raise :class:`IncompatibleCheckpointError` if ``state_dict`` cannot be loaded.

        Checks everything :meth:`load_state_dict` needs, so that a restore can call it
        before the first live object changes (``stateful.check`` and ``restore.apply`` do):
        the keys; each state's type; then each state is loaded into a *scratch* generator
        of its kind (``random.Random``, ``np.random.RandomState``, ``torch.Generator``),
        which runs the very checks (sizes, versions, value ranges) the real load runs,
        without touching the process's streams. CUDA states must be uint8 tensors of the
        size this process's devices use; extra or missing devices only warn on load.
        """
        if not isinstance(state_dict, dict) or set(state_dict) != _KEYS:
            found = (
                sorted(map(str, state_dict))[:8]
                if isinstance(state_dict, dict)
                else type(state_dict).__name__
            )
            raise IncompatibleCheckpointError(
                f"random state needs keys {sorted(_KEYS)}, got {found}"
            )
        py = state_dict["python"]
        if not (
            isinstance(py, tuple)
            and len(py) == 3
            and isinstance(py[1], tuple)
            and (py[2] is None or type(py[2]) is float)
            and all(type(w) is int and 0 <= w < 1 << 32 for w in py[1])
        ):
            raise IncompatibleCheckpointError(
                "random state: 'python' is not a random.getstate() tuple"
            )
        _dry_run("python", lambda: random.Random().setstate(py))
        npst = state_dict["numpy"]
        if not (isinstance(npst, tuple) and len(npst) == 5 and isinstance(npst[1], np.ndarray)):
            raise IncompatibleCheckpointError(
                "random state: 'numpy' is not an np.random.get_state() tuple"
            )
        _dry_run("numpy", lambda: np.random.RandomState().set_state(npst))
        states = (
            [state_dict["torch"], *state_dict["cuda"]]
            if isinstance(state_dict["cuda"], list)
            else None
        )
        if states is None or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in states
        ):
            raise IncompatibleCheckpointError(
                "random state: torch generator states must be uint8 tensors"
            )
        cpu = state_dict["torch"]
        _dry_run("torch", lambda: torch.Generator().set_state(_cpu_bytes(cpu)))
        here = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for i, st in enumerate(state_dict["cuda"][:here]):
            size = torch.cuda.get_rng_state(i).numel()
            if st.dim() != 1 or st.numel() != size:
                raise IncompatibleCheckpointError(
                    f"random state: 'cuda'[{i}] holds {st.numel()} bytes of shape {list(st.shape)}, "
                    f"device {i} uses {size}"
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore every stream from ``state_dict`` (see the class docstring for CUDA)."""
        self.validate_state_dict(state_dict)
        cuda = state_dict["cuda"]
        here = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if cuda and len(cuda) != here:
            warnings.warn(
                f"the checkpoint holds random states for {len(cuda)} CUDA device(s), this process has "
                f"{here}; restoring {min(len(cuda), here)} of them",
                stacklevel=2,
            )
        random.setstate(state_dict["python"])
        np.random.set_state(state_dict["numpy"])
        torch.set_rng_state(_cpu_bytes(state_dict["torch"]))
        for i, st in enumerate(cuda[:here]):
            torch.cuda.set_rng_state(_cpu_bytes(st), i)


def _dry_run(which: str, load: Callable[[], Any]) -> None:
    try:
        load()
    except Exception as e:  # TypeError, ValueError, OverflowError, RuntimeError ...
        text = " ".join(str(e).split())[:160]
        raise IncompatibleCheckpointError(
            f"random state: {which!r} cannot be loaded ({type(e).__name__}: {text})"
        ) from None


def _cpu_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.uint8).contiguous()
