"""Thread layout on a small CPU machine: J concurrent jobs x K torch threads each, for the study's mix.

The default study runs one torch thread per job and lets Snakemake run as many jobs as there are cores.
The alternative is fewer jobs with more threads each. Each layout does the same work: every job runs the
same mix (teacher and sCD training steps, alternating, at one size and batch), and a layout with fewer jobs
runs its share of the mixes one after the other. Throughput is mixes per second of wall time; each layout's
wall time is the median over repeats. Every job is a fresh process (threads are fixed per process), timed
from inside after a warm-up, so process start-up is not counted.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class LayoutTiming:
    layout: str               # "JxK": J concurrent jobs of K threads
    jobs: int
    threads: int
    mixes: int                # mixes done in all (the same for every layout)
    median_s: float           # wall seconds of the whole layout, median over repeats
    min_s: float
    max_s: float
    repeats: int
    mixes_per_s: float        # throughput: mixes / median_s


def _child(spec_json: str) -> None:
    """Subprocess entry: build the steps with K threads, warm up, then time `mixes` mixes; prints seconds."""
    import torch

    from scm.bench.training import _step_fn
    from scm.config import resolve

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    steps = [_step_fn(resolve(spec["dataset"], spec["size"], m, {"run.batch_size": spec["batch"]}),
                      torch.device("cpu"))[0] for m in spec["methods"]]
    for step in steps:  # warm-up: first-call allocations and Adam's state
        step()
    start = time.perf_counter()
    for _ in range(spec["mixes"]):
        for step in steps:
            step()
    sys.stdout.write(json.dumps({"seconds": time.perf_counter() - start}) + "\n")


def _run_jobs(jobs: int, spec: dict) -> float:
    """Start `jobs` children at once; the layout's time is the slowest child's timed loop."""
    cmd = [sys.executable, "-c", "import sys; from scm.bench.threads import _child; _child(sys.argv[1])",
           json.dumps(spec)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(jobs)]
    seconds = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"thread-layout job failed:\n{err[-2000:]}")
        seconds.append(json.loads(out.strip().splitlines()[-1])["seconds"])
    return max(seconds)


def thread_layouts(layouts: list[tuple[int, int]], size: str = "tS", batch: int = 32, mixes: int = 20,
                   repeats: int = 3, dataset: str = "shapes", methods=("teacher", "scd")) -> list[LayoutTiming]:
    """Wall time and throughput of each (jobs, threads) layout doing the same total work.

    The total is `mixes` x the largest job count: a layout with J jobs gives each job mixes x max_J / J, so
    1x2 and 2x1 both do 2 x mixes mixes. Layouts are interleaved within each repeat (drift hits all alike).
    """
    most = max(j for j, _ in layouts)
    times: dict[tuple[int, int], list[float]] = {lay: [] for lay in layouts}
    for rep in range(repeats):
        for jobs, threads in layouts:
            spec = {"dataset": dataset, "size": size, "batch": batch, "methods": list(methods),
                    "threads": threads, "mixes": mixes * most // jobs}
            times[(jobs, threads)].append(_run_jobs(jobs, spec))
            log.info("repeat %d/%d: %dx%d %.1f s", rep + 1, repeats, jobs, threads, times[(jobs, threads)][-1])
    rows = []
    for (jobs, threads), ts in times.items():
        med = statistics.median(ts)
        rows.append(LayoutTiming(f"{jobs}x{threads}", jobs, threads, mixes * most, med, min(ts), max(ts),
                                 len(ts), mixes * most / med))
    return rows
