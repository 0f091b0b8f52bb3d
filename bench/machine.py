"""The machine a benchmark ran on, recorded next to every figure."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from typing import Any

import torch

__all__ = ["describe", "write_result", "median"]


def describe(path: str = ".") -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    disk = shutil.disk_usage(path)
    from recoverkit._native import engine

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "disk_free_gib": round(disk.free / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "engine": engine.BACKEND,
        "hardware_crc32c": bool(engine.hardware_crc32c()),
        "cuda": torch.cuda.is_available(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def write_result(path: str, result: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
