"""Benchmarks (not tests): measured times, median over repeats with min and max, hardware stated.

- training: `step_benchmark` (a full training step of teacher, sCT and sCD, methods interleaved within each
  repeat; optionally its peak memory, `step_peak_memory`), `jvp_benchmark` (the network's forward vs its
  JVP engines: manual, torch.func.jvp, the float64 central difference).
- kernels: `attention_benchmark` (math, blockwise and fused attention JVP against sequence length, time
  and peak memory), `sampling_benchmark` (images/s of consistency and teacher sampling).
- threads: `thread_layouts` (J concurrent jobs x K torch threads doing the same training work).
- orchestration: `dag_benchmark` (Snakemake's DAG construction), `slurm_latency_benchmark`.
- overhead: a finished pipeline's wall time split into the work its runs report and the rest.
- output: `write_csv` and the `plot_*` functions write the files; everything else returns rows.
- gpu: the GPU checks run by bench/gpu_checks.py in one device call (fused attention kernel accuracy,
  timings and memory; fp16 safety of sCD steps; the network's JVP); imported on its own (scm.bench.gpu).

`scm bench ...` (scm.cli) prints and writes them; docs/benchmarks.md records the numbers.
"""

from scm.bench.common import Timing, hardware
from scm.bench.kernels import (
    AttentionTiming,
    SamplingTiming,
    attention_benchmark,
    attention_memory_ratio,
    largest_allocation_bytes,
    sampling_benchmark,
)
from scm.bench.orchestration import OrchestrationTiming, dag_benchmark, slurm_latency_benchmark
from scm.bench.output import plot_attention, plot_orchestration, plot_sampling, plot_timings, write_csv
from scm.bench.threads import LayoutTiming, thread_layouts
from scm.bench.training import (
    JVP_METHODS,
    jvp_benchmark,
    jvp_ratios,
    ratios,
    ratios_by_batch,
    step_benchmark,
    step_peak_memory,
)

__all__ = [
    "JVP_METHODS", "AttentionTiming", "OrchestrationTiming", "SamplingTiming", "Timing", "attention_benchmark",
    "attention_memory_ratio", "dag_benchmark", "hardware", "jvp_benchmark", "jvp_ratios",
    "largest_allocation_bytes", "plot_attention", "plot_orchestration", "plot_sampling", "plot_timings",
    "ratios", "ratios_by_batch", "sampling_benchmark", "slurm_latency_benchmark", "step_benchmark",
    "step_peak_memory", "thread_layouts", "LayoutTiming", "write_csv",
]
