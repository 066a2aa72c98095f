"""Benchmarks (not tests): measured times, median over repeats with min and max, hardware stated.

`step_benchmark` times one full training step (loss, backward, optimizer) for the teacher, sCT and
sCD at given sizes, interleaving the methods within each repeat so that drift hits all alike.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from scm import config as C
from scm.losses import build_loss
from scm.networks import build_network

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


def _step_fn(cfg: C.Config, device: torch.device):
    """A closure running one training step of cfg.run.method on random data."""
    torch.manual_seed(0)
    net = build_network(cfg.network, cfg.data, cfg.sigma_d).to(device).train()
    teacher = None
    if cfg.run.method == "scd":
        teacher = build_network(cfg.network, cfg.data, cfg.sigma_d).to(device).eval().requires_grad_(False)
    loss_fn = build_loss(cfg.run.method, cfg.loss, cfg.sigma_d, teacher)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr)
    B, res, ch = cfg.run.batch_size, cfg.data.resolution, cfg.data.channels
    x0 = torch.randn(B, ch, res, res, device=device) * cfg.sigma_d
    labels = torch.randint(0, cfg.data.label_dim, (B,), device=device) if cfg.data.label_dim else None

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(net, x0, labels, step=10**9)
        loss.mean().backward()
        opt.step()

    params_m = sum(p.numel() for p in net.parameters()) / 1e6
    return step, params_m


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_benchmark(sizes: list[str], batch: int = 64, repeats: int = 7, warmup: int = 2,
                   dataset: str = "shapes", methods=("teacher", "sct", "scd"), device: str = "cpu",
                   overrides: dict | None = None) -> list[Timing]:
    """Median / min / max seconds per training step for each (method, size)."""
    dev = torch.device(device)
    rows = []
    for size in sizes:
        fns = {}
        for method in methods:
            cfg = C.resolve(dataset, size, method, {"run.batch_size": batch, **(overrides or {})})
            fns[method] = _step_fn(cfg, dev)
        times = {m: [] for m in methods}
        for rep in range(warmup + repeats):
            for m in methods:  # interleaved: drift affects every method alike
                fn, _ = fns[m]
                _sync(dev)
                start = time.perf_counter()
                fn()
                _sync(dev)
                if rep >= warmup:
                    times[m].append(time.perf_counter() - start)
            log.info("size %s repeat %d/%d", size, rep + 1, warmup + repeats)
        for m in methods:
            ts = times[m]
            rows.append(Timing(m, size, batch, fns[m][1], statistics.median(ts), min(ts), max(ts), len(ts)))
    return rows


def ratios(rows: list[Timing]) -> dict[str, dict[str, float]]:
    """{size: {'sCD/teacher': x, 'sCT/teacher': y}} from medians measured in the same run."""
    out: dict[str, dict[str, float]] = {}
    by = {(r.method, r.size): r for r in rows}
    for (method, size), r in by.items():
        if method == "teacher":
            continue
        base = by.get(("teacher", size))
        if base:
            name = {"scd": "sCD", "sct": "sCT"}[method]
            out.setdefault(size, {})[f"{name}/teacher"] = r.median_s / base.median_s
    return out
