"""recoverkit._native: backend selection by RECOVERKIT_NATIVE and by argument."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from recoverkit import _native

from .helpers import load_backend

NAMES = {
    "BACKEND", "crc32c", "crc32c_ptr", "crc32c_combine", "hardware_crc32c", "cuda_available",
    "StagingPool", "CopyEngine", "CopyHandle", "write_segment", "read_segment",
}


def _backend_under(env_value: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("RECOVERKIT_NATIVE", None)
    if env_value is not None:
        env["RECOVERKIT_NATIVE"] = env_value
    code = "from recoverkit._native import engine; print(engine.BACKEND)"
    return subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code],
                          env=env, capture_output=True, text=True, check=False)


def test_env_zero_selects_python():
    r = _backend_under("0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "python"


def test_env_one_and_unset_select_native():
    load_backend("native")  # skips when the extension is not built
    for value in ("1", None, ""):
        r = _backend_under(value)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "native"


def test_bad_env_value_is_rejected():
    r = _backend_under("maybe")
    assert r.returncode != 0 and "RECOVERKIT_NATIVE" in r.stderr


def test_missing_extension(monkeypatch):
    def no_native():
        raise ImportError("No module named 'recoverkit._C'")

    monkeypatch.setattr(_native, "_import_native", no_native)
    with pytest.raises(ImportError, match="RECOVERKIT_NATIVE=0"):
        _native.load("native")
    monkeypatch.setenv("RECOVERKIT_NATIVE", "1")
    with pytest.raises(ImportError, match="required"):
        _native.load()
    monkeypatch.delenv("RECOVERKIT_NATIVE")
    with pytest.warns(RuntimeWarning, match="pure-Python"):
        assert _native.load().BACKEND == "python"


def test_unknown_backend_name():
    with pytest.raises(ValueError):
        _native.load("gpu")


def test_both_backends_expose_the_same_names(engine):
    assert NAMES <= set(dir(engine))
    assert engine.BACKEND in ("native", "python")
