import math

import torch

from scm.trigflow import add_noise, consistency_fn, sample_t, sigma_to_t, t_to_sigma, velocity_target


def test_consistency_fn_is_identity_at_t0():
    x = torch.randn(5, 3, 4, 4)
    F = torch.randn_like(x)
    assert torch.equal(consistency_fn(x, torch.zeros(5), F, 0.5), x)


def test_sigma_t_round_trip_and_t_max():
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    assert torch.allclose(t_to_sigma(sigma_to_t(sigma, 0.5), 0.5), sigma, rtol=1e-12)
    # sCM Sec. 5.2: t_max = arctan(80 / 0.5) = 1.56454
    assert abs(sigma_to_t(80.0, 0.5) - 1.56454) < 1e-5


def test_edm_relation_x_t_equals_cos_t_x_sigma():
    x0, n = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    t = sigma_to_t(sigma, 0.5)
    x_sigma = x0 + sigma[:, None] * n  # EDM: x_sigma = x0 + sigma n
    x_t = add_noise(x0, 0.5 * n, t)  # TrigFlow with z = sigma_d n
    assert torch.allclose(x_t, torch.cos(t)[:, None] * x_sigma, atol=1e-12)


def test_velocity_is_time_derivative_of_noising():
    x0, z = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    t, h = torch.tensor([0.1, 0.7, 1.5], dtype=torch.float64), 1e-6
    fd = (add_noise(x0, z, t + h) - add_noise(x0, z, t - h)) / (2 * h)
    assert torch.allclose(velocity_target(x0, z, t), fd, atol=1e-8)


def test_time_proposal_is_log_normal_in_sigma():
    g = torch.Generator().manual_seed(0)
    t = sample_t(400_000, -0.8, 1.6, 0.5, generator=g, dtype=torch.float64)
    log_sigma = torch.log(0.5 * torch.tan(t))
    assert abs(log_sigma.mean().item() - (-0.8)) < 0.01
    assert abs(log_sigma.std().item() - 1.6) < 0.01
    assert (t > 0).all() and (t < math.pi / 2).all()
