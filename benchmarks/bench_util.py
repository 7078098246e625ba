"""Helpers shared by the benchmark scripts: the CPU's name, peak memory, argument types.

Imported by the scripts in this folder (each puts the folder on ``sys.path`` after the
repository root, so that ``import hypergrad`` still finds the package, not
``benchmarks/hypergrad.py``).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
from collections.abc import Callable
from typing import Any

import torch


def hardware() -> str:
    """The CPU model (``lscpu``'s "Model name"), else what ``platform`` knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of rounds, steps, threads, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def cuda_peak(fn: Callable[[], Any]) -> float:
    """The peak CUDA memory ``fn()`` allocates above what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def proc_status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MiB."""
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024
