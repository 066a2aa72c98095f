"""Kernel benchmarks: attention (math, blockwise, fused) against sequence length, time and peak memory;
sampling throughput of consistency and teacher samplers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from scm.bench.common import _stats, _sync
from scm.config import resolve
from scm.networks import build_network

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Attention against sequence length.


@dataclass
class AttentionTiming:
    impl: str  # math_forward, math_jvp, blockwise_jvp (fused online-softmax pass), triton_jvp (CUDA)
    seq: int
    batch: int
    heads: int
    head_dim: int
    block_size: int
    median_s: float
    min_s: float
    max_s: float
    repeats: int
    peak_mem_mb: float
    memory_kind: str


def largest_allocation_bytes(fn) -> int:
    """Largest CPU memory (bytes) any single op run by fn() allocates itself (children excluded).

    As tests/unit/test_attention.py: self, not inclusive, memory per profiler event, so that a
    Function's own event (which includes its outputs) does not count its children's allocations twice.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)


def _attention_fns(q, k, v, tq, tk, tv, block_size: int, device: torch.device) -> dict:
    from scm.attention import attention_blockwise_jvp, attention_math, attention_math_jvp

    fns = {
        "math_forward": lambda: attention_math(q, k, v),
        "math_jvp": lambda: attention_math_jvp(q, k, v, tq, tk, tv),
        "blockwise_jvp": lambda: attention_blockwise_jvp(q, k, v, tq, tk, tv, block_size),
    }
    if device.type == "cuda":
        try:
            from scm.triton_attention import flash_attention_jvp

            fns["triton_jvp"] = lambda: flash_attention_jvp(q, k, v, tq, tk, tv)
        except ImportError:
            log.info("triton not importable: no triton_jvp rows")
    return fns


def attention_benchmark(seqs: list[int], batch: int = 1, heads: int = 4, head_dim: int = 64,
                        block_size: int = 64, repeats: int = 3, warmup: int = 1, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> list[AttentionTiming]:
    """Time and peak memory of math forward, math JVP and blockwise (+ triton on CUDA) JVP per length N.

    q, k, v require grad (as in training: the JVP's `out` keeps its graph). Peak memory, measured in a
    separate untimed call: CUDA, max_memory_allocated above the inputs; CPU, the largest single
    allocation (torch.profiler, profile_memory) -- an N x N tensor shows as N^2 * 4 bytes per (batch, head).
    """
    dev = torch.device(device)
    rows = []
    for n in seqs:
        gen = torch.Generator(device="cpu").manual_seed(n)
        q, k, v, tq, tk, tv = (torch.randn(batch, heads, n, head_dim, generator=gen).to(dev, dtype)
                               for _ in range(6))
        q, k, v = (z.requires_grad_() for z in (q, k, v))
        fns = _attention_fns(q, k, v, tq, tk, tv, block_size, dev)
        times = {m: [] for m in fns}
        for rep in range(warmup + repeats):
            for m, fn in fns.items():
                _sync(dev)
                start = time.perf_counter()
                out = fn()
                _sync(dev)
                if rep >= warmup:
                    times[m].append(time.perf_counter() - start)
                del out
        for m, fn in fns.items():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                base = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                out = fn()
                torch.cuda.synchronize(dev)
                peak, kind = torch.cuda.max_memory_allocated(dev) - base, "cuda max_memory_allocated delta"
                del out
            else:
                peak, kind = largest_allocation_bytes(fn), "cpu largest single allocation (profiler)"
            rows.append(AttentionTiming(m, n, batch, heads, head_dim, block_size, *_stats(times[m]),
                                        len(times[m]), peak / 2**20, kind))
    return rows


def attention_memory_ratio(rows: list[AttentionTiming], fused: str | None = None) -> tuple[int, str, float] | None:
    """(N, fused impl, fused / math_jvp peak memory) at the largest N measured (triton if present)."""
    if not rows:
        return None
    n = max(r.seq for r in rows)
    by = {r.impl: r for r in rows if r.seq == n}
    fused = fused or ("triton_jvp" if "triton_jvp" in by else "blockwise_jvp")
    if fused not in by or "math_jvp" not in by or by["math_jvp"].peak_mem_mb <= 0:
        return None
    return n, fused, by[fused].peak_mem_mb / by["math_jvp"].peak_mem_mb


# ----------------------------------------------------------------------------
# Sampling throughput.


@dataclass
class SamplingTiming:
    sampler: str  # cm (consistency sampling), euler, dpm2s (teacher PF-ODE solvers)
    steps: int
    nfe: int
    size: str
    batch: int
    median_s: float
    min_s: float
    max_s: float
    images_per_s: float  # batch / median_s
    images_per_s_min: float  # batch / max_s
    images_per_s_max: float  # batch / min_s
    repeats: int


def sampling_benchmark(size: str = "tS", nfes: list[int] = (1, 2, 4, 8, 16), batch: int = 64, repeats: int = 5,
                       warmup: int = 1, dataset: str = "shapes", device: str = "cpu") -> list[SamplingTiming]:
    """Images/s of consistency sampling with `steps` = each NFE and of the teacher's Euler (NFE = steps)
    and DPM-Solver-2S (steps = NFE // 2 + 1, NFE = 2 steps - 1: the nearest odd NFE >= the requested
    one; the actual NFE is in the row) on one untrained net (throughput only; outputs are meaningless)."""
    from scm.samplers import consistency_sample, teacher_sample

    dev = torch.device(device)
    cfg = resolve(dataset, size, "teacher")
    torch.manual_seed(0)
    net = build_network(cfg.network, cfg.data, cfg.sigma_d).to(dev).eval()
    res, ch, sd = cfg.data.resolution, cfg.data.channels, cfg.sigma_d
    gen = torch.Generator(device=dev).manual_seed(0)
    noise = torch.randn(batch, ch, res, res, device=dev, generator=gen)
    labels = torch.randint(0, cfg.data.label_dim, (batch,), device=dev, generator=gen) if cfg.data.label_dim else None
    configs = []
    for nfe in nfes:
        configs.append(("cm", nfe, lambda s=nfe: consistency_sample(net, noise, sd, labels, steps=s, generator=gen)))
        configs.append(("euler", nfe, lambda s=nfe: teacher_sample(net, noise, sd, labels, "euler", steps=s)))
        s2 = nfe // 2 + 1
        configs.append(("dpm2s", s2, lambda s=s2: teacher_sample(net, noise, sd, labels, "dpm2s", steps=s)))
    times = [[] for _ in configs]
    counted = [0] * len(configs)
    for rep in range(warmup + repeats):
        for i, (_, _, fn) in enumerate(configs):  # interleaved
            _sync(dev)
            start = time.perf_counter()
            _, counted[i] = fn()
            _sync(dev)
            if rep >= warmup:
                times[i].append(time.perf_counter() - start)
    rows = []
    for (sampler, steps, _), ts, nfe in zip(configs, times, counted):
        med, lo, hi = _stats(ts)
        rows.append(SamplingTiming(sampler, steps, nfe, size, batch, med, lo, hi, batch / med, batch / hi,
                                   batch / lo, len(ts)))
    return rows
