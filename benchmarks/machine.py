"""The machine a benchmark ran on, for its report: CPU model name and the flags that pick kernels / dtypes."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_name() -> str:
    """The "model name" of /proc/cpuinfo (the platform string where it is missing)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """{"cpu", "cores", "flags"} of this machine."""
    info = Path("/proc/cpuinfo")
    have = set(info.read_text().split()) if info.is_file() else set()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "flags": [f for f in FLAGS if f in have]}
