"""Benchmarks (not tests): measured times, median over repeats with min and max, hardware stated.

- `step_benchmark`: one full training step (loss, backward, gradient norm, optimizer, EMA) for the teacher,
  sCT and sCD at given sizes and batch sizes, interleaving the methods within each repeat so that drift hits all alike;
  optionally the peak memory of a step (CUDA: max_memory_allocated; CPU: peak-RSS growth of a fresh
  subprocess, see `step_peak_memory`).
- `jvp_benchmark`: the network's forward pass vs forward_with_tangent vs torch.func.jvp vs the float64
  central difference of loss.jvp_impl=finite_difference (no grad).
- `attention_benchmark`: math forward, math JVP and blockwise / fused JVP against sequence length, with
  time and peak memory (CPU: the largest single allocation recorded by torch.profiler).
- `sampling_benchmark`: images/s of consistency sampling and teacher sampling on an untrained net.
- `dag_benchmark`, `slurm_latency_benchmark`: pipeline orchestration costs.

Library only: functions return rows (dataclasses); `write_csv` and the `plot_*` functions write files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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
    peak_mem_mb: float | None = None  # peak memory of one step (see step_peak_memory); None: not measured
    memory_kind: str = ""  # how peak_mem_mb was measured


def _stats(ts: list[float]) -> tuple[float, float, float]:
    return statistics.median(ts), min(ts), max(ts)


def _step_fn(cfg: C.Config, device: torch.device):
    """A closure running one training step of cfg.run.method on random data, as scm.train does it:
    loss, backward, gradient norm, the run's optimizer, EMA update."""
    from scm.ema import EMA
    from scm.train import _optimizer, grad_norm_and_clip

    torch.manual_seed(0)
    net = build_network(cfg.network, cfg.data, cfg.sigma_d, device).to(device).train()
    teacher = None
    if cfg.run.method == "scd":
        teacher = build_network(cfg.network, cfg.data, cfg.sigma_d, device).to(device).eval().requires_grad_(False)
    loss_fn = build_loss(cfg.run.method, cfg.loss, cfg.sigma_d, teacher)
    opt = _optimizer(cfg.optim, net.parameters())
    ema = EMA(net, cfg.ema)
    B, res, ch = cfg.run.batch_size, cfg.data.resolution, cfg.data.channels
    x0 = torch.randn(B, ch, res, res, device=device) * cfg.sigma_d
    labels = torch.randint(0, cfg.data.label_dim, (B,), device=device) if cfg.data.label_dim else None
    count = [0]

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(net, x0, labels, step=10**9)
        loss.mean().backward()
        grad_norm_and_clip(net.parameters(), cfg.optim.grad_clip or float("inf"))
        opt.step()
        count[0] += 1
        ema.update(net, count[0] * B, B)

    params_m = sum(p.numel() for p in net.parameters()) / 1e6
    return step, params_m


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_benchmark(sizes: list[str], batch: int = 64, repeats: int = 7, warmup: int = 2,
                   dataset: str = "shapes", methods=("teacher", "sct", "scd"), device: str = "cpu",
                   overrides: dict | None = None, batches: list[int] | None = None,
                   memory: bool = False) -> list[Timing]:
    """Median / min / max seconds per training step for each (method, size, batch).

    batches (if given) replaces batch with a sweep; memory=True adds each config's peak memory
    (step_peak_memory: a fresh subprocess per config on the CPU).
    """
    dev = torch.device(device)
    rows = []
    for b in batches or [batch]:
        for size in sizes:
            fns = {}
            for method in methods:
                cfg = C.resolve(dataset, size, method, {"run.batch_size": b, **(overrides or {})})
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
                log.info("size %s batch %d repeat %d/%d", size, b, rep + 1, warmup + repeats)
            params = {m: fns[m][1] for m in methods}
            del fns  # free the models before the memory measurements
            for m in methods:
                row = Timing(m, size, b, params[m], *_stats(times[m]), len(times[m]))
                if memory:
                    row.peak_mem_mb, row.memory_kind = step_peak_memory(dataset, size, m, b, device, overrides)
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------
# Peak memory of a training step.


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _child_step_peak(spec_json: str) -> None:
    """Subprocess entry (CPU): setup, reset the RSS high-water mark (Linux: clear_refs 5), two steps;
    prints VmHWM - VmRSS-before in KiB. (ru_maxrss cannot be reset: import-time peaks hid the step's.)"""
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    cfg = C.resolve(spec["dataset"], spec["size"], spec["method"],
                    {"run.batch_size": spec["batch"], **spec["overrides"]})
    step, _ = _step_fn(cfg, torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _proc_status_kib("VmRSS")
    for _ in range(2):  # the first step also allocates Adam's state, the second is a steady-state step
        step()
    after = _proc_status_kib("VmHWM")
    sys.stdout.write(json.dumps({"peak_kib": after - before}) + "\n")


def step_peak_memory(dataset: str, size: str, method: str, batch: int, device: str = "cpu",
                     overrides: dict | None = None) -> tuple[float, str]:
    """(MiB, kind): peak memory a training step needs above the model and data.

    CUDA: torch.cuda.max_memory_allocated during two steps minus the memory allocated before them.
    CPU: growth of the process's peak RSS (VmHWM, reset after setup) over two steps, in a fresh
    subprocess per config (the allocator's caching would hide a second config's peak behind the first's).
    Includes Adam's state, created by the first step.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        cfg = C.resolve(dataset, size, method, {"run.batch_size": batch, **(overrides or {})})
        step, _ = _step_fn(cfg, dev)
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(2):
            step()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**20, "cuda max_memory_allocated delta"
    spec = json.dumps({"dataset": dataset, "size": size, "method": method, "batch": batch,
                       "overrides": overrides or {}, "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, "-c", "import sys; from scm.bench import _child_step_peak; "
                           "_child_step_peak(sys.argv[1])", spec],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for {method} {size} batch {batch} failed:\n{proc.stderr[-2000:]}")
    kib = json.loads(proc.stdout.strip().splitlines()[-1])["peak_kib"]
    return kib / 1024, "cpu peak RSS (VmHWM) growth, fresh process"


def ratios(rows: list[Timing]) -> dict[str, dict[str, float]]:
    """{size: {'sCD/teacher': x, 'sCT/teacher': y}} from medians measured in the same run."""
    out: dict[str, dict[str, float]] = {}
    by = {(r.method, r.size): r for r in rows}  # the last batch measured wins (see ratios_by_batch)
    for (method, size), r in by.items():
        if method == "teacher":
            continue
        base = by.get(("teacher", size))
        if base:
            name = {"scd": "sCD", "sct": "sCT"}[method]
            out.setdefault(size, {})[f"{name}/teacher"] = r.median_s / base.median_s
    return out


def ratios_by_batch(rows: list[Timing]) -> dict[tuple[str, int], dict[str, float]]:
    """{(size, batch): {'sCD/teacher': x, 'sCT/teacher': y}}: ratios() for every batch size measured."""
    out = {}
    for b in sorted({r.batch for r in rows}):
        for size, rs in ratios([r for r in rows if r.batch == b]).items():
            out[(size, b)] = rs
    return out


# ----------------------------------------------------------------------------
# The network's JVP against its forward pass.


JVP_METHODS = ("forward", "forward_with_tangent", "func.jvp", "finite_difference")


def jvp_benchmark(sizes: list[str], batch: int = 64, repeats: int = 7, warmup: int = 2, dataset: str = "shapes",
                  device: str = "cpu", overrides: dict | None = None) -> list[Timing]:
    """Seconds of net(x, t) vs net.forward_with_tangent(x, t, tx, tt) vs torch.func.jvp(net, (x, t), (tx, tt))
    vs finite_difference: F = net(x, t) and dF by the loss's float64 central difference (F and dF, as
    forward_with_tangent gives; the step is LossConfig's default).

    All run without autograd (torch.no_grad, eval mode), interleaved within each repeat; the
    method column holds the variant. Forward-mode AD (torch.func.jvp) is unaffected by no_grad.
    """
    dev = torch.device(device)
    rows = []
    for size in sizes:
        cfg = C.resolve(dataset, size, "scd", {"run.batch_size": batch, **(overrides or {})})
        torch.manual_seed(0)
        net = build_network(cfg.network, cfg.data, cfg.sigma_d).to(dev).eval()
        with torch.no_grad():
            net.out_gain.fill_(1.0)  # F and dF not identically zero (the output gain starts at 0)
        res, ch = cfg.data.resolution, cfg.data.channels
        x = torch.randn(batch, ch, res, res, device=dev)
        t = torch.rand(batch, device=dev) * 1.5 + 0.01
        tx, tt = torch.randn_like(x), torch.ones_like(t)
        labels = torch.randint(0, cfg.data.label_dim, (batch,), device=dev) if cfg.data.label_dim else None
        fns = _jvp_fns(net, x, t, tx, tt, labels)
        times = {m: [] for m in fns}
        with torch.no_grad():
            for rep in range(warmup + repeats):
                for m, fn in fns.items():
                    _sync(dev)
                    start = time.perf_counter()
                    fn()
                    _sync(dev)
                    if rep >= warmup:
                        times[m].append(time.perf_counter() - start)
        params_m = sum(p.numel() for p in net.parameters()) / 1e6
        for m in fns:
            rows.append(Timing(m, size, batch, params_m, *_stats(times[m]), len(times[m])))
    return rows


def _jvp_fns(net, x, t, tx, tt, labels) -> dict:
    from scm.config import LossConfig
    from scm.losses import _finite_difference_jvp

    h = LossConfig.jvp_fd_step
    return {
        "forward": lambda: net(x, t, labels),
        "forward_with_tangent": lambda: net.forward_with_tangent(x, t, tx, tt, labels),
        "func.jvp": lambda: torch.func.jvp(lambda x_, t_: net(x_, t_, labels), (x, t), (tx, tt)),
        "finite_difference": lambda: (net(x, t, labels), _finite_difference_jvp(net, x, t, tx, tt, labels, None, h)),
    }


def jvp_ratios(rows: list[Timing]) -> dict[str, dict[str, float]]:
    """{size: {'forward_with_tangent/forward': x, 'func.jvp/forward': y, ...}} from medians of one run."""
    by = {(r.method, r.size): r for r in rows}
    out: dict[str, dict[str, float]] = {}
    for (method, size), r in by.items():
        base = by.get(("forward", size))
        if method != "forward" and base:
            out.setdefault(size, {})[f"{method}/forward"] = r.median_s / base.median_s
    return out


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
    cfg = C.resolve(dataset, size, "teacher")
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


# ----------------------------------------------------------------------------
# Orchestration: DAG construction and SLURM submission latency.


@dataclass
class OrchestrationTiming:
    what: str  # dag_imagenet512 (s), slurm_submit_to_start (s)
    median_s: float | None
    min_s: float | None
    max_s: float | None
    repeats: int
    note: str


def _wall(cmd: list[str], cwd: str | Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stderr or proc.stdout)[-2000:]}")
    return elapsed


def dag_benchmark(configfile: str = "config/imagenet512.yaml", profile: str = "profiles/slurm", repeats: int = 3,
                  snakemake: str | None = None, cwd: str | Path = ".", extra: list[str] = ()) -> OrchestrationTiming:
    """DAG construction: wall time of `snakemake -n --configfile F --profile P` minus that of
    `snakemake --version` (interpreter start and imports), each the median of `repeats` runs."""
    exe = snakemake or str(Path(sys.executable).with_name("snakemake"))
    tmp = tempfile.TemporaryDirectory(prefix="scm-dag-")
    study = _with_placeholder_inputs(Path(cwd) / configfile, Path(tmp.name))
    dry = [exe, "-n", "--configfile", str(study), "--profile", profile, *extra]
    ver = [exe, "--version"]
    dry_t, ver_t = [], []
    for _ in range(repeats):  # interleaved
        ver_t.append(_wall(ver, cwd))
        dry_t.append(_wall(dry, cwd))
    tmp.cleanup()
    base = statistics.median(ver_t)
    diffs = [d - base for d in dry_t]
    placeholders = " (absent eval inputs replaced by empty placeholder files)" if study.parent == Path(tmp.name) else ""
    return OrchestrationTiming(f"dag_{Path(configfile).stem}", *_stats(diffs), repeats,
                               f"snakemake -n median {statistics.median(dry_t):.2f} s minus --version median "
                               f"{base:.2f} s; min/max over the dry runs{placeholders}")


def _with_placeholder_inputs(configfile: Path, tmp: Path) -> Path:
    """The study file itself, or a copy in `tmp` whose absent eval inputs (weights, decoder, reference
    statistics: checked when the DAG is built, never read by a dry run) point at empty files."""
    import yaml

    from scm.evaluate import EVAL_INPUT_KEYS

    if not configfile.exists():
        return configfile  # snakemake names it
    study = yaml.safe_load(configfile.read_text()) or {}
    ev = study.get("eval") or {}
    absent = [k for k in EVAL_INPUT_KEYS if ev.get(k) and not Path(ev[k]).exists()]
    if not absent:
        return configfile
    for key in absent:
        (tmp / key).write_bytes(b"")
        ev[key] = str(tmp / key)
    out = tmp / configfile.name
    out.write_text(yaml.safe_dump(study, sort_keys=False))
    return out


def slurm_latency_benchmark(folder: str | Path, jobs: int = 5, profile=None,
                            timeout_s: float = 300.0) -> OrchestrationTiming:
    """Seconds from ex.submit() to the job function's first line, for `jobs` tiny submitit jobs on SLURM.

    Skipped (median None, note says why) unless a SLURM controller answers `sinfo`. The job's clock is
    this machine's, so the number is exact on a single-node cluster and includes clock skew otherwise."""
    from scm.launch import ClusterProfile, make_executor

    what = "slurm_submit_to_start"
    if shutil.which("sinfo") is None:
        return OrchestrationTiming(what, None, None, None, 0, "skipped: no SLURM here (sinfo not on PATH)")
    st = subprocess.run(["sinfo", "--noheader"], capture_output=True, text=True, check=False)
    if st.returncode != 0:
        return OrchestrationTiming(what, None, None, None, 0, "skipped: no SLURM controller answers sinfo")
    profile = profile or ClusterProfile(partition="debug", cpus_per_task=1, mem_gb=0.5, time_min=5)
    ex = make_executor("slurm", folder, profile, job_name="scm-bench-latency")
    submitted = []
    for _ in range(jobs):
        t0 = time.time()
        submitted.append((t0, ex.submit(time.time)))  # the job returns its start time
    deadline = time.time() + timeout_s
    delays = []
    for t0, job in submitted:
        while not job.done():
            if time.time() > deadline:
                raise TimeoutError(f"SLURM job {job.job_id} not done after {timeout_s} s")
            time.sleep(0.2)
        delays.append(job.result() - t0)
    return OrchestrationTiming(what, *_stats(delays), jobs,
                               f"{jobs} submitit jobs, partition {profile.partition or '(default)'}; "
                               "start = time.time() in the job function")


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
