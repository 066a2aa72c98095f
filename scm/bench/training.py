"""Training-step benchmarks: a full step of teacher, sCT and sCD (time, peak memory) and the network's JVP
against its forward pass (manual, torch.func.jvp, the float64 central difference)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import torch

from scm.bench.common import Timing, _stats, _timed
from scm.config import Config, resolve
from scm.losses import build_loss
from scm.networks import build_network

log = logging.getLogger(__name__)


def _step_fn(cfg: Config, device: torch.device):
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
                cfg = resolve(dataset, size, method, {"run.batch_size": b, **(overrides or {})})
                fns[method] = _step_fn(cfg, dev)
            times = {m: [] for m in methods}
            for rep in range(warmup + repeats):
                for m in methods:  # interleaved: drift affects every method alike
                    seconds = _timed(fns[m][0], dev)
                    if rep >= warmup:
                        times[m].append(seconds)
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
    cfg = resolve(spec["dataset"], spec["size"], spec["method"],
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
        cfg = resolve(dataset, size, method, {"run.batch_size": batch, **(overrides or {})})
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
    proc = subprocess.run([sys.executable, "-c", "import sys; from scm.bench.training import _child_step_peak; "
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
        cfg = resolve(dataset, size, "scd", {"run.batch_size": batch, **(overrides or {})})
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
                    seconds = _timed(fn, dev)
                    if rep >= warmup:
                        times[m].append(seconds)
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
