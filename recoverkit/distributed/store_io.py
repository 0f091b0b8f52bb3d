"""Store calls the regroup and the heartbeat share: a failure is a lost store, and every
value read back is checked before it is used.

Where it sits: under :mod:`.regroup` and :mod:`.heartbeat` (and the elastic layer's
admission), which read the job's key-value store; every value another process wrote there is
hostile.
"""

from __future__ import annotations

from typing import Any

from ..errors import RegroupError

__all__: list[str] = []


def _store_call(what: str, fn: Any, *args: Any) -> Any:
    """Runs one store call; any failure means the store is unreachable (its host is gone)."""
    try:
        return fn(*args)
    except RegroupError:
        raise
    except Exception as e:  # noqa: BLE001 - DistNetworkError, DistStoreError, RuntimeError
        raise RegroupError(
            f"the shared store is unreachable ({what}: {type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "the node hosting it is probably the lost one: in-process re-forming is impossible, "
            "fall back to the restart path",
            reason="store_lost",
        ) from e


def _check_int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RegroupError(f"{what}: expected an integer in [{lo}, {hi}], got {value!r:.80}", reason="invalid")
    return value


def _read_count(store: Any, key: str, what: str) -> int:
    """A counter another process bumps with ``add``, read without ``add``: 0 while it is absent.

    ``add(key, 0)`` would read it too, but a TCPStore server drops the connection of a client
    whose ``add`` meets a value that is not an integer, so a hostile value would cost this
    process its store connection. Read as bytes, it is checked instead.
    """
    if not store.check([key]):
        return 0
    raw = store.get(key)
    if not isinstance(raw, bytes) or not 0 < len(raw) <= 20 or not raw.isdigit():
        raise RegroupError(f"{what} ({key}): expected a decimal counter, got {bytes(raw)[:24]!r}", reason="invalid")
    return _check_int(int(raw), what, 0, 2**62)
