"""Benchmark output: a CSV with the hardware column, PNG plots (median with min-max error bars)."""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

from scm.bench.common import Timing, hardware
from scm.bench.kernels import AttentionTiming, SamplingTiming
from scm.bench.orchestration import OrchestrationTiming

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Output: CSV with the hardware line, PNG plots (median with min-max error bars).


def write_csv(rows: list, path: str | Path, hw: str | None = None) -> Path:
    """One row per dataclass row plus a hardware column."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hw = hw or hardware()
    dicts = [dataclasses.asdict(r) for r in rows]
    fields = [*(dicts[0] if dicts else {}), "hardware"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for d in dicts:
            w.writerow({**d, "hardware": hw})
    return path


def _errbar(ax, xs, meds, los, his, label, **kw):
    yerr = [[m - lo for m, lo in zip(meds, los)], [hi - m for m, hi in zip(meds, his)]]
    ax.errorbar(xs, meds, yerr=yerr, marker="o", capsize=3, label=label, **kw)


def _figure(ncols: int, title: str, hw: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2), squeeze=False)
    fig.suptitle(f"{title}\n{hw}", fontsize=8)
    return plt, fig, axes[0]


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timings(rows: list[Timing], path: str | Path, title: str, hw: str | None = None) -> Path:
    """Step / JVP times: seconds per size for every (method, batch); peak memory in a second panel if any."""
    hw = hw or hardware()
    has_mem = any(r.peak_mem_mb is not None for r in rows)
    plt, fig, axes = _figure(2 if has_mem else 1, title, hw)
    sizes = list(dict.fromkeys(r.size for r in rows))
    series = list(dict.fromkeys((r.method, r.batch) for r in rows))
    for method, b in series:
        rs = [next(r for r in rows if (r.method, r.batch, r.size) == (method, b, s)) for s in sizes
              if any((r.method, r.batch, r.size) == (method, b, s) for r in rows)]
        xs = [sizes.index(r.size) for r in rs]
        _errbar(axes[0], xs, [r.median_s for r in rs], [r.min_s for r in rs], [r.max_s for r in rs],
                f"{method} (batch {b})")
        if has_mem:
            axes[1].plot(xs, [r.peak_mem_mb or 0 for r in rs], marker="s", label=f"{method} (batch {b})")
    for ax in axes:
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_xlabel("size")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"seconds, median [min, max] of {rows[0].repeats}")
    if has_mem:
        axes[1].set_ylabel("peak memory MiB")
        axes[1].set_title(rows[0].memory_kind, fontsize=8)
    return _save(plt, fig, Path(path))


def plot_attention(rows: list[AttentionTiming], path: str | Path, hw: str | None = None) -> Path:
    hw = hw or hardware()
    r0 = rows[0]
    plt, fig, axes = _figure(2, f"attention: B={r0.batch}, H={r0.heads}, D={r0.head_dim}, block {r0.block_size}", hw)
    for impl in dict.fromkeys(r.impl for r in rows):
        rs = sorted((r for r in rows if r.impl == impl), key=lambda r: r.seq)
        xs = [r.seq for r in rs]
        _errbar(axes[0], xs, [r.median_s for r in rs], [r.min_s for r in rs], [r.max_s for r in rs], impl)
        axes[1].plot(xs, [r.peak_mem_mb for r in rs], marker="s", label=impl)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"seconds, median [min, max] of {r0.repeats}")
    axes[1].set_ylabel("peak memory MiB")
    axes[1].set_title(r0.memory_kind, fontsize=8)
    return _save(plt, fig, Path(path))


def plot_sampling(rows: list[SamplingTiming], path: str | Path, hw: str | None = None) -> Path:
    hw = hw or hardware()
    r0 = rows[0]
    plt, fig, axes = _figure(1, f"sampling throughput: size {r0.size}, batch {r0.batch} (untrained net)", hw)
    for sampler in dict.fromkeys(r.sampler for r in rows):
        rs = sorted((r for r in rows if r.sampler == sampler), key=lambda r: r.nfe)
        _errbar(axes[0], [r.nfe for r in rs], [r.images_per_s for r in rs], [r.images_per_s_min for r in rs],
                [r.images_per_s_max for r in rs], sampler)
    ax = axes[0]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(f"images/s, median [min, max] of {r0.repeats}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(plt, fig, Path(path))


def plot_orchestration(rows: list[OrchestrationTiming], path: str | Path, hw: str | None = None) -> Path:
    hw = hw or hardware()
    plt, fig, axes = _figure(1, "orchestration", hw)
    done = [r for r in rows if r.median_s is not None]
    ax = axes[0]
    if done:
        xs = list(range(len(done)))
        yerr = [[r.median_s - r.min_s for r in done], [r.max_s - r.median_s for r in done]]
        ax.bar(xs, [r.median_s for r in done], yerr=yerr, capsize=4)
        ax.set_xticks(xs, [f"{r.what}\n(n={r.repeats})" for r in done], fontsize=7)
    skipped = [f"{r.what}: {r.note}" for r in rows if r.median_s is None]
    if skipped:
        ax.text(0.02, 0.98, "\n".join(skipped), transform=ax.transAxes, va="top", fontsize=7)
    ax.set_ylabel("seconds, median [min, max]")
    ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, Path(path))
