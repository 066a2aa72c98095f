"""TrigFlow parameterization (Lu & Song 2024, Sec. 3 and App. B).

x_t = cos(t) x0 + sin(t) z with z ~ N(0, sigma_d^2 I), t in [0, pi/2].
The network F_theta sees (x_t / sigma_d, t); the consistency function is
f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t).
"""

from __future__ import annotations

import math

import torch


def bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) time -> (B, 1, ..., 1) to broadcast against x."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


# ----------------------------------------------------------------------------
# Noising and the PF-ODE target.


def add_noise(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = cos(t) x0 + sin(t) z (z already has std sigma_d)."""
    tb = bcast(t, x0)
    return torch.cos(tb) * x0 + torch.sin(tb) * z


def velocity_target(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v_t = dx_t/dt = cos(t) z - sin(t) x0 (the teacher's regression target and sCT's dx_t/dt)."""
    tb = bcast(t, x0)
    return torch.cos(tb) * z - torch.sin(tb) * x0


def consistency_fn(x_t: torch.Tensor, t: torch.Tensor, F: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F  (c_skip = cos t, c_out = -sigma_d sin t)."""
    tb = bcast(t, x_t)
    return torch.cos(tb) * x_t - torch.sin(tb) * sigma_d * F


# ----------------------------------------------------------------------------
# EDM <-> TrigFlow time: t = arctan(sigma / sigma_d), x_t = cos(t) x_sigma.


def sigma_to_t(sigma, sigma_d: float):
    if isinstance(sigma, torch.Tensor):
        return torch.atan(sigma / sigma_d)
    return math.atan(sigma / sigma_d)


def t_to_sigma(t, sigma_d: float):
    if isinstance(t, torch.Tensor):
        return sigma_d * torch.tan(t)
    return sigma_d * math.tan(t)


# ----------------------------------------------------------------------------
# Time proposal: tau ~ N(P_mean, P_std^2), t = arctan(exp(tau) / sigma_d).


def sample_t(n: int, P_mean: float, P_std: float, sigma_d: float, generator=None,
             device=None, dtype=torch.float32) -> torch.Tensor:
    tau = torch.randn(n, generator=generator, device=device, dtype=dtype) * P_std + P_mean
    return torch.atan(torch.exp(tau) / sigma_d)
