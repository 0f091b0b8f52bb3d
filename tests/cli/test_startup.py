"""The CLI starts light: ``--help`` and the commands that only read bytes import no torch,
and exporting a small checkpoint imports no compiler stack.

``import torch`` alone takes about a second, and ``recoverkit restore --format torch`` once
spent ~1.8 s importing ``torch._dynamo`` (pulled in by ``FakeTensorMode``) for a 2.5 MiB
checkpoint. These tests run the real command in a child process and list the modules it
imported; they never time anything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from recoverkit import Checkpointer

#: Modules a small export must not import: the compiler stack (seconds of start-up) and
#: the libraries only other formats or tiers need.
HEAVY = ("torch._dynamo", "torch._inductor", "sympy", "torch.distributed.checkpoint", "tensorstore", "zarr")

RUN = r"""
import json, sys
from recoverkit.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps(sorted(sys.modules)))
"""


def _imported(*args: str) -> set[str]:
    p = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return set(json.loads(p.stdout.strip().splitlines()[-1]))


def _heavy(modules: set[str], allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY if h not in allowed))


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("small") / "ckpt")
    gen = torch.Generator().manual_seed(0)
    state = {"model": {f"layer{i}.weight": torch.rand(64, 640, generator=gen) for i in range(16)},
             "extra": {"bf16": torch.rand(3, 5, generator=gen).to(torch.bfloat16), "u16": torch.arange(7).to(torch.uint16), "f8": torch.rand(4, generator=gen).to(torch.float8_e4m3fn),
                       "scalar": torch.tensor(2.5), "empty": torch.empty(0, 4)}}
    state["model"]["tied"] = state["model"]["layer0.weight"]
    with Checkpointer(root) as ckpt:
        ckpt.save(1, state)
    return root, state


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_small_export_imports_no_compiler_stack(small_root, tmp_path, fmt):
    root, state = small_root
    out = str(tmp_path / f"out.{fmt}")
    heavy = _heavy(_imported("restore", root, "--to", out, "--format", fmt))
    assert not heavy, f"--format {fmt} imported {heavy}"
    if fmt == "torch":  # and the placeholders became real, complete tensors
        loaded = torch.load(out, weights_only=True)
        for entry in ("model", "extra"):
            for k, v in state[entry].items():
                assert loaded[entry][k].dtype == v.dtype and torch.equal(loaded[entry][k], v), (entry, k)
        assert loaded["model"]["tied"].untyped_storage().data_ptr() == loaded["model"]["layer0.weight"].untyped_storage().data_ptr()


def test_help_imports_no_export_library():
    heavy = _heavy(_imported("--help"))
    assert not heavy, f"--help imported {heavy}"


def test_dcp_export_imports_dcp_only_when_asked(small_root, tmp_path):
    root, _ = small_root
    modules = _imported("restore", root, "--to", str(tmp_path / "dcp"), "--format", "dcp")
    assert "torch.distributed.checkpoint" in modules
    assert not _heavy(modules, allowed=("torch.distributed.checkpoint", "sympy")), _heavy(modules, allowed=("torch.distributed.checkpoint", "sympy"))


# ------------------------------------------------------------------ no torch at all
def _torch(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m == "torch" or m.startswith("torch."))


def test_help_never_imports_torch():
    for args in (("--help",), ("restore", "--help"), ("ls", "--help"), ("verify", "--help")):
        assert not _torch(_imported(*args)), f"{' '.join(args)} imported torch"


def test_import_recoverkit_imports_no_torch():
    p = subprocess.run([sys.executable, "-c", "import sys, recoverkit, recoverkit.cli; "
                        "print('torch' in sys.modules); recoverkit.SaveHandle; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.split() == ["False", "False"], (p.stdout, p.stderr)


@pytest.mark.parametrize("command", ["ls", "verify", "inspect"])
def test_read_only_commands_never_import_torch(small_root, command):
    root, _ = small_root
    assert not _torch(_imported(command, root)), f"{command} imported torch"


def test_small_torch_export_never_imports_torch(small_root, tmp_path):
    root, state = small_root
    out = str(tmp_path / "out.pt")
    assert not _torch(_imported("restore", root, "--to", out, "--format", "torch")), "restore --format torch imported torch"
