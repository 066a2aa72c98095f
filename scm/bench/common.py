"""What every benchmark shares: the hardware line, timing rows (median, min, max over repeats)."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def hardware() -> str:
    """A one-line description of the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__} with {torch.get_num_threads()} threads; {dev}"


@dataclass
class Timing:
    method: str
    size: str
    batch: int
    params_m: float
    median_s: float
    min_s: float
    max_s: float
    repeats: int
    peak_mem_mb: float | None = None  # peak memory of one step (see step_peak_memory); None: not measured
    memory_kind: str = ""  # how peak_mem_mb was measured


def _stats(ts: list[float]) -> tuple[float, float, float]:
    return statistics.median(ts), min(ts), max(ts)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    """Seconds of one call of fn, the device synchronized before and after (CUDA runs asynchronously)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _wall(cmd: list[str], cwd: str | Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stderr or proc.stdout)[-2000:]}")
    return elapsed
