#!/usr/bin/env python3
"""How well a trained teacher denoises at small noise levels (docs/default-study.md, finding 3).

For each run directory: rmse(D(x0 + sigma n) - x0) / sigma on 256 real `shapes` images of a held-out
seed (7), fixed noise, class labels given. 1 means the denoiser removes nothing; a good denoiser of this
data goes well below 1 once sigma exceeds the 8-bit quantization step (~0.004). D is the TrigFlow
x0-prediction at t = arctan(sigma / sigma_d): D = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t), with
x_t = cos(t) (x0 + sigma n) (sCM Eq. 1 and Sec. 2.2).

    .venv/bin/python bench/low_noise_probe.py results/runs/teacher-tS-base-s0 results/runs/teacher-tS-c_noise_1000t-s0
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scm.shapes import generate_shapes  # noqa: E402
from scm.train import load_final  # noqa: E402

SIGMAS = (0.002, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
PROBE_DATA_SEED, PROBE_NOISE_SEED, NUM = 7, 0, 256


@torch.no_grad()
def low_noise_ratio(net, sigma_d: float, x0: torch.Tensor, labels: torch.Tensor | None,
                    noise: torch.Tensor) -> dict[str, float]:
    """rmse(D(x0 + sigma n) - x0) / sigma at each of SIGMAS, D the network's TrigFlow x0-prediction."""
    out = {}
    for sigma in SIGMAS:
        t = math.atan(sigma / sigma_d)
        x_t = math.cos(t) * (x0 + sigma * noise)
        F = net(x_t / sigma_d, torch.full((len(x0),), t), labels, None)
        D = math.cos(t) * x_t - math.sin(t) * sigma_d * F
        out[f"{sigma:g}"] = round(float((D - x0).pow(2).mean().sqrt() / sigma), 3)
    return out


def run_ratio(run_dir: Path) -> dict[str, float]:
    """The probe on a finished run's EMA network, with held-out shapes of its renderer version."""
    net, cfg = load_final(run_dir)
    images, labels = generate_shapes(NUM, cfg.data.resolution, seed=PROBE_DATA_SEED, version=cfg.data.shapes_version)
    x0 = torch.from_numpy(images).float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(PROBE_NOISE_SEED))
    return low_noise_ratio(net, cfg.sigma_d, x0, torch.from_numpy(labels), noise)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for run_dir in args.run_dirs:
        print(json.dumps({"run": run_dir.name, "ratio": run_ratio(run_dir)}))


if __name__ == "__main__":
    main()
