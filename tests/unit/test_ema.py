import math

import pytest
import torch

from scm.config import EMAConfig
from scm.ema import EMA, power_function_beta, sigma_rel_to_gamma


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2])
def test_gamma_inverts_edm2_relative_std(sigma_rel):
    g = sigma_rel_to_gamma(sigma_rel)
    # EDM2 Eq. 3: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))
    assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(sigma_rel, rel=1e-9)


def test_power_function_ema_equals_weighted_average():
    # beta_t = (1 - 1/t)^(gamma + 1) telescopes to weights w_s = s^(gamma+1) - (s-1)^(gamma+1): the
    # integral of t^gamma over each step (EDM2 Eq. 4's power-function profile).
    sigma_rel, T = 0.1, 200
    net = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(net, EMAConfig(kind="power", sigma_rel=sigma_rel))
    values = torch.randn(T, dtype=torch.float64)
    for step in range(1, T + 1):
        net.weight.data.fill_(values[step - 1].item())
        ema.update(net, cur_nimg=step * 8, batch_size=8)
    g = sigma_rel_to_gamma(sigma_rel)
    s = torch.arange(1, T + 1, dtype=torch.float64)
    w = s ** (g + 1) - (s - 1) ** (g + 1)
    expected = (w * values).sum().item() / w.sum().item()
    assert ema.model.weight.item() == pytest.approx(expected, rel=1e-5)
    assert power_function_beta(sigma_rel, 0) == 0.0


def test_halflife_ema_halves_the_distance():
    net = torch.nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(0.0)
    ema = EMA(net, EMAConfig(kind="halflife", halflife_kimg=1.0, rampup=0.0))
    net.weight.data.fill_(1.0)
    for step in range(1, 11):  # 10 steps of 100 images = one half-life of 1 kimg
        ema.update(net, cur_nimg=step * 100, batch_size=100)
    assert ema.model.weight.item() == pytest.approx(0.5, rel=1e-9)
