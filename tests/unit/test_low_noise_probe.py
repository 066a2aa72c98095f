"""bench/low_noise_probe.py: its x0-prediction against the closed form of a network that outputs F = 0."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def _probe():
    spec = importlib.util.spec_from_file_location("low_noise_probe", ROOT / "bench" / "low_noise_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ZeroF(torch.nn.Module):
    def forward(self, x, t, labels, guidance):
        return torch.zeros_like(x)


def test_zero_network_matches_its_closed_form():
    """F = 0 gives D = cos^2(t) (x0 + sigma n) with tan t = sigma / sigma_d, i.e. cos^2 t = sigma_d^2 /
    (sigma_d^2 + sigma^2): the ratio is computed here in float64 numpy from that formula alone."""
    probe = _probe()
    sigma_d = 0.5
    g = np.random.default_rng(0)
    x0, n = g.uniform(-1, 1, (4, 3, 8, 8)), g.standard_normal((4, 3, 8, 8))
    got = probe.low_noise_ratio(ZeroF(), sigma_d, torch.tensor(x0, dtype=torch.float32), None,
                                torch.tensor(n, dtype=torch.float32))
    for sigma in probe.SIGMAS:
        c2 = sigma_d**2 / (sigma_d**2 + sigma**2)
        want = math.sqrt(np.mean((c2 * (x0 + sigma * n) - x0) ** 2)) / sigma
        assert abs(got[f"{sigma:g}"] - round(want, 3)) <= 2e-3 * max(1.0, want), sigma
