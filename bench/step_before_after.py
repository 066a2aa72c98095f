#!/usr/bin/env python3
"""Training-step time before and after a change to the network, in ONE process (docs/benchmarks.md).

The previous `scm/networks.py` is loaded from a git worktree of the old commit under another module name,
beside the current one; the previous step code (single-tensor Adam, torch's clip_grad_norm_, one lerp_ per
parameter for the EMA) is kept here. For each size and method both steps are built from the same seed and
run back to back, repeat after repeat, so load on a shared machine hits both alike. Times are CPU seconds
per step (time.process_time, one thread); the step is scm.train's: loss, backward, gradient norm, optimizer,
EMA. Run from the repository root:

    git worktree add /tmp/before HEAD        # the code before the change
    OMP_NUM_THREADS=1 .venv/bin/python bench/step_before_after.py /tmp/before --sizes tS tM --repeats 10

Prints one markdown row per (size, method): median [min, max] CPU s per step before and after, speed-up.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time

import torch

from scm import networks as networks_after
from scm.config import Config, resolve
from scm.ema import EMA
from scm.losses import build_loss
from scm.train import _optimizer, grad_norm_and_clip


def make_step(cfg: Config, networks, previous: bool):
    torch.manual_seed(0)
    net = networks.build_network(cfg.network, cfg.data, cfg.sigma_d).train()
    teacher = None
    if cfg.run.method == "scd":
        teacher = networks.build_network(cfg.network, cfg.data, cfg.sigma_d).eval().requires_grad_(False)
    loss_fn = build_loss(cfg.run.method, cfg.loss, cfg.sigma_d, teacher)
    beta = EMA(torch.nn.Linear(1, 1), cfg.ema).beta(10**6, 1)
    if previous:
        opt = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                               eps=cfg.optim.eps)
        ema_model = copy.deepcopy(net).eval().requires_grad_(False)

        def finish():
            torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf")).item()
            opt.step()
            with torch.no_grad():
                for p_ema, p in zip(ema_model.parameters(), net.parameters()):
                    p_ema.lerp_(p.detach(), 1 - beta)
    else:
        opt, ema = _optimizer(cfg.optim, net.parameters()), EMA(net, cfg.ema)

        def finish():
            grad_norm_and_clip(net.parameters(), float("inf"))
            opt.step()
            ema.update(net, 10**6, 1)  # the same beta as above (power EMA at step 10^6)

    g = torch.Generator().manual_seed(1)
    B, res, ch = cfg.run.batch_size, cfg.data.resolution, cfg.data.channels
    x0 = torch.randn(B, ch, res, res, generator=g) * cfg.sigma_d
    labels = torch.randint(0, max(cfg.data.label_dim, 1), (B,), generator=g) if cfg.data.label_dim else None

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(net, x0, labels, step=10**6)
        loss.float().mean().backward()
        finish()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="a checkout (git worktree) of the previous commit")
    ap.add_argument("--sizes", nargs="+", default=["tS", "tM"])
    ap.add_argument("--methods", nargs="+", default=["teacher", "sct", "scd"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("scm_networks_before", f"{args.before}/scm/networks.py")
    networks_before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(networks_before)
    print("| size | method | before: CPU s/step, median [min, max] | after | speed-up (median) |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        steps = {}
        for m in args.methods:
            cfg = resolve("shapes", size, m, {"run.batch_size": args.batch})
            steps[m] = (make_step(cfg, networks_before, True), make_step(cfg, networks_after, False))
        times = {m: ([], []) for m in args.methods}
        for rep in range(2 + args.repeats):  # 2 warm-up steps
            for m, fns in steps.items():
                for fn, ts in zip(fns, times[m]):
                    start = time.process_time()
                    fn()
                    if rep >= 2:
                        ts.append(time.process_time() - start)
        for m, (b, a) in times.items():
            mb, ma = statistics.median(b), statistics.median(a)
            print(f"| {size} | {m} | {mb:.3f} [{min(b):.3f}, {max(b):.3f}] | {ma:.3f} [{min(a):.3f}, {max(a):.3f}] "
                  f"| {mb / ma:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
