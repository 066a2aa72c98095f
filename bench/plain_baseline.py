#!/usr/bin/env python3
"""Plain EDM baseline on `shapes`: the control experiment of docs/default-study.md.

A plain EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models")
class-conditional U-Net that shares no network, loss or sampler code with the project: GroupNorm residual
blocks with a scale/shift conditioning, no attention, 32 channels x (1, 2, 2), 2 blocks per level (1.57 M
parameters); random Fourier features of c_noise; EDM preconditioning and loss weighting, log-normal noise
levels P = (-1.2, 1.2); Adam 1e-3, EMA 0.999 with warmup; Heun's 2nd-order sampler, 16 steps. It trains on
`scm.shapes.generate_shapes(num_images, 16, seed=0, version=V)` and, every --eval-every steps, draws
class-conditional samples (labels i % 8, fixed noise) from the EMA network and reports the fraction that
the project's shapes extractor classifies as their label (`scm.metrics.class_accuracy`). At the end it
reports the low-noise denoising ratio rmse(D(x0 + sigma n) - x0) / sigma on 256 real images.

It answers: does the project's teacher learn `shapes` as fast as an ordinary diffusion model of similar
size (docs/default-study.md, finding 2), and how well does such a model denoise at small sigma (finding 3)?
The baseline rows there come from (run from the repository root; one thread):

    OMP_NUM_THREADS=1 .venv/bin/python bench/plain_baseline.py --version 2 --steps 400 --eval-every 200

Writes under --out: log.json (settings, one row per evaluation, the low-noise ratios; rewritten after
every evaluation) and samples-{step:06d}.png (the first 64 samples, one class per column).
Deterministic given --seed: the network's initialisation comes from torch.manual_seed(seed), the training
batches and noise from a generator of their own; sampling and the low-noise probe use fixed seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from scm.data import save_image_grid
from scm.extractors import shapes_extractor_path
from scm.metrics import class_accuracy, make_reference, to_uint8
from scm.shapes import generate_shapes

SIGMA_DATA = 0.5  # EDM's sigma_data
SAMPLE_SEED = 12345  # noise of the evaluation samples (the same at every evaluation)
PROBE_DATA_SEED, PROBE_NOISE_SEED = 7, 0  # the low-noise probe: real images of another seed, fixed noise
PROBE_SIGMAS = (0.002, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
NUM_CLASSES = 8


# ----------------------------------------------------------------------------
# The network F_theta: a conditional U-Net (GroupNorm, no attention).


class ResBlock(nn.Module):
    """GroupNorm - SiLU - conv, then scale/shift by the embedding, GroupNorm - SiLU - conv (zero-initialised)."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, 1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(h)


class UNet(nn.Module):
    def __init__(self, ch: int = 32, mult=(1, 2, 2), blocks: int = 2, num_classes: int = NUM_CLASSES):
        super().__init__()
        emb = ch * 4
        # Random Fourier features of c_noise (EDM's NCSN++ embedding), scale 16; drawn first from the global RNG.
        self.register_buffer("freqs", torch.randn(ch // 2) * 16)
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(num_classes, emb)
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips, c = [ch], ch
        for i, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(ResBlock(c, ch * m, emb))
                c = ch * m
                skips.append(c)
            if i < len(mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb), ResBlock(c, c, emb)])
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), ch * m, emb))
                c = ch * m
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2))
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        f = c_noise[:, None] * self.freqs[None] * 2 * math.pi
        emb = F.silu(self.time_mlp(torch.cat([f.cos(), f.sin()], 1)) + self.label_emb(labels))
        h = self.inp(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], 1), emb) if isinstance(block, ResBlock) else block(h)
        return self.out(h)


# ----------------------------------------------------------------------------
# EDM: preconditioning, loss, sampler.


def denoise(net: UNet, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM eq. 7), sigma of shape (B,)."""
    s = sigma[:, None, None, None]
    # Preconditioning of EDM Table 1: c_in, c_skip, c_out; c_noise = ln(sigma) / 4.
    c_in = 1 / (s**2 + SIGMA_DATA**2).sqrt()
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s * SIGMA_DATA / (s**2 + SIGMA_DATA**2).sqrt()
    return c_skip * x + c_out * net(c_in * x, sigma.log() / 4, labels)


def edm_loss(net: UNet, x: torch.Tensor, labels: torch.Tensor, p_mean: float, p_std: float,
             gen: torch.Generator) -> torch.Tensor:
    """E[lambda(sigma) ||D(x + n; sigma) - x||^2] (EDM eq. 8 with Table 1's training choices)."""
    # Noise distribution of EDM Table 1: ln(sigma) ~ N(P_mean, P_std^2).
    sigma = (torch.randn(len(x), generator=gen) * p_std + p_mean).exp()
    # Loss weighting of EDM Table 1: lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    noise = torch.randn(x.shape, generator=gen) * sigma[:, None, None, None]
    return (weight[:, None, None, None] * (denoise(net, x + noise, sigma, labels) - x) ** 2).mean()


@torch.no_grad()
def heun_sample(net: UNet, noise: torch.Tensor, labels: torch.Tensor, steps: int = 16, sigma_min: float = 0.002,
                sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Deterministic Heun sampler (EDM Algorithm 1) from x_0 = sigma_max * noise."""
    # Time steps of EDM eq. 5 (Table 1, sampling): sigma_i = (sigma_max^(1/rho) + i/(N-1) (...))^rho, sigma_N = 0.
    i = torch.arange(steps)
    sigmas = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sigmas = torch.cat([sigmas, torch.zeros(1)])
    x = noise * sigmas[0]
    for k in range(steps):
        s, s_next = sigmas[k], sigmas[k + 1]
        # Euler step along dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 3 with sigma(t) = t, s(t) = 1).
        d = (x - denoise(net, x, s.expand(len(x)), labels)) / s
        x_next = x + (s_next - s) * d
        # Heun's 2nd-order correction, except on the last step to sigma = 0 (Algorithm 1, lines 7-8).
        if s_next > 0:
            d_next = (x_next - denoise(net, x_next, s_next.expand(len(x)), labels)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d_next)
        x = x_next
    return x


@torch.no_grad()
def low_noise_ratio(net: UNet, version: int, num: int = 256) -> dict[str, float]:
    """rmse(D(x0 + sigma n; sigma) - x0) / sigma on real images of another seed: 1 = removes no noise."""
    x0, labels = generate_shapes(num, 16, PROBE_DATA_SEED, version)
    x0, labels = torch.from_numpy(x0).float() / 127.5 - 1, torch.from_numpy(labels)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(PROBE_NOISE_SEED))
    out = {}
    for s in PROBE_SIGMAS:
        err = denoise(net, x0 + s * z, torch.full((num,), s), labels) - x0
        out[str(s)] = round(err.square().mean().sqrt().item() / s, 3)
    return out


# ----------------------------------------------------------------------------
# The experiment.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="training steps")
    p.add_argument("--version", type=int, default=1, help="renderer version of shapes (data.shapes_version)")
    p.add_argument("--num-images", type=int, default=2048, help="training images (generate_shapes, seed 0)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (constant)")
    p.add_argument("--ch", type=int, default=32, help="base channels of the U-Net")
    p.add_argument("--p-mean", type=float, default=-1.2, help="EDM P_mean of ln(sigma)")
    p.add_argument("--p-std", type=float, default=1.2, help="EDM P_std of ln(sigma)")
    p.add_argument("--eval-every", type=int, default=400, help="evaluate every N steps (and at the last step)")
    p.add_argument("--num-samples", type=int, default=256, help="samples per evaluation (labels i %% 8)")
    p.add_argument("--sampler-steps", type=int, default=16, help="Heun steps (2 * steps - 1 evaluations)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the training draws")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default="results/bench/plain_baseline", help="folder for log.json and sample grids")
    p.add_argument("--extractor", default=None,
                   help="shapes extractor weights (default: scm.metrics.shapes_extractor_path(version), "
                        "trained first if missing)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    images, labels = (torch.from_numpy(a) for a in generate_shapes(args.num_images, 16, 0, args.version))
    x_train = images.float() / 127.5 - 1
    # The project's class-accuracy measurement: its shapes extractor for this renderer version (trained if
    # missing at the default path; given weights must be trained on the same version).
    extractor = args.extractor or shapes_extractor_path(args.version)
    ref = make_reference("shapes", images, weights_path=extractor, labels=labels, shapes_version=args.version)

    torch.manual_seed(args.seed)
    net = UNet(args.ch)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    num_params = sum(p.numel() for p in net.parameters())
    print(f"plain EDM baseline: shapes v{args.version}, {num_params} parameters, extractor {ref.weights_path}",
          flush=True)

    sample_noise = torch.randn(args.num_samples, 3, 16, 16, generator=torch.Generator().manual_seed(SAMPLE_SEED))
    sample_labels = torch.arange(args.num_samples) % NUM_CLASSES
    log = {"script": "bench/plain_baseline.py", "args": vars(args), "params": num_params,
           "extractor": str(ref.weights_path), "evals": []}
    log_path = out / "log.json"
    t0, eval_seconds = time.time(), 0.0
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(x_train), (args.batch,), generator=gen)
        loss = edm_loss(net, x_train[idx], labels[idx], args.p_mean, args.p_std, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        # EMA of the weights, decay min(0.999, (1 + step) / (10 + step)).
        beta = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - beta)

        if step % args.eval_every == 0 or step == args.steps:
            t1 = time.time()
            samples = heun_sample(ema, sample_noise, sample_labels, args.sampler_steps).clamp(-1, 1)
            acc = class_accuracy(to_uint8(samples), sample_labels, ref)
            save_image_grid(samples[:64], str(out / f"samples-{step:06d}.png"), nrow=NUM_CLASSES)
            eval_seconds += time.time() - t1
            row = {"step": step, "kimg": step * args.batch / 1000, "loss": round(loss.item(), 5),
                   "class_accuracy": acc, "num_samples": args.num_samples,
                   "train_s": round(time.time() - t0 - eval_seconds, 1)}
            log["evals"].append(row)
            print(json.dumps(row), flush=True)
            log_path.write_text(json.dumps(log, indent=1) + "\n")

    log["low_noise_ratio"] = low_noise_ratio(ema, args.version)
    print("rmse(D - x0) / sigma:", json.dumps(log["low_noise_ratio"]), flush=True)
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    print(f"wrote {log_path}", flush=True)
    return log


if __name__ == "__main__":
    main()
