"""Sampling in TrigFlow time (Lu & Song 2024, Sec. 5.2 and App. G).

Consistency models: 1 step from t_max, 2 steps through t_mid = 1.1, or M steps.
Teachers: Euler, Heun and DPM-Solver-2S on the PF-ODE dx_t/dt = sigma_d F(x_t / sigma_d, t).
Every sampler returns (samples, nfe) where NFE counts network evaluations (a guided step counts 2x).
"""

from __future__ import annotations

import math

import torch

from scm.trigflow import consistency_fn, sigma_to_t


def guided_F(net, x_t, t, sigma_d, labels=None, guidance: float = 1.0, guidance_input: bool = False):
    """F(x_t / sigma_d, t); with CFG (teacher, guidance != 1): F_u + s (F_c - F_u), 2 evaluations.

    A CM distilled with a guidance input takes the scale as input instead (1 evaluation).
    Returns (F, evaluations).
    """
    x_in = x_t / sigma_d
    if guidance_input:
        s = torch.full((x_t.shape[0],), guidance, device=x_t.device, dtype=x_t.dtype)
        return net(x_in, t, labels, s), 1
    F = net(x_in, t, labels, None)
    if guidance == 1.0 or labels is None:
        return F, 1
    F_u = net(x_in, t, None, None)
    return F_u + guidance * (F - F_u), 2


def _full(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------
# Consistency sampling.


def cm_times(steps: int, sigma_max: float, sigma_d: float, t_mid: float = 1.1) -> list[float]:
    """t_max = arctan(sigma_max / sigma_d), then t_mid for 2 steps; for M > 2 steps, M - 1 times spaced
    linearly from t_mid down to t_mid / (M - 1) (our choice: the paper does not give its M-step schedule)."""
    t_max = sigma_to_t(sigma_max, sigma_d)
    if steps == 1:
        return [t_max]
    return [t_max] + [t_mid * (steps - 1 - i) / (steps - 1) for i in range(steps - 1)]


@torch.no_grad()
def consistency_sample(net, noise: torch.Tensor, sigma_d: float, labels=None, steps: int = 1,
                       sigma_max: float = 80.0, t_mid: float = 1.1, times: list[float] | None = None,
                       guidance: float = 1.0, guidance_input: bool = False, generator=None):
    """x = sigma_d z, x0 = f(x, t_max); then for each later t: x = cos t x0 + sin t sigma_d z', x0 = f(x, t).

    `noise` is standard normal with the data's shape; fresh noise for later steps comes from `generator`.
    """
    times = times or cm_times(steps, sigma_max, sigma_d, t_mid)
    x0, nfe = None, 0
    for i, t in enumerate(times):
        if i == 0:
            x_t = sigma_d * noise
        else:
            z = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
            x_t = math.cos(t) * x0 + math.sin(t) * sigma_d * z
        tt = _full(t, x_t)
        F, n = guided_F(net, x_t, tt, sigma_d, labels, guidance, guidance_input)
        x0, nfe = consistency_fn(x_t, tt, F, sigma_d), nfe + n
    return x0, nfe


# ----------------------------------------------------------------------------
# Teacher PF-ODE solvers.


def teacher_times(steps: int, sigma_d: float, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> list[float]:
    """EDM's rho-spaced sigmas mapped to TrigFlow time, t = arctan(sigma / sigma_d), then t = 0."""
    ramp = [i / max(steps - 1, 1) for i in range(steps)]
    sigmas = [(sigma_max ** (1 / rho) + r * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
              for r in ramp]
    return [sigma_to_t(s, sigma_d) for s in sigmas] + [0.0]


@torch.no_grad()
def teacher_sample(net, noise: torch.Tensor, sigma_d: float, labels=None, solver: str = "dpm2s",
                   steps: int = 32, sigma_max: float = 80.0, guidance: float = 1.0):
    """Solve the PF-ODE from t_max to 0. NFE: euler = steps, heun and dpm2s = 2 steps - 1."""
    times = teacher_times(steps, sigma_d, sigma_max=sigma_max)
    x = sigma_d * noise
    nfe = 0

    def velocity(x_t, t):
        nonlocal nfe
        F, n = guided_F(net, x_t, _full(t, x_t), sigma_d, labels, guidance)
        nfe += n
        return sigma_d * F

    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        last = i == len(times) - 2
        if solver == "euler" or (last and solver == "heun"):
            x = x + (t_next - t) * velocity(x, t)
        elif solver == "heun":
            # Heun's 2nd-order method (EDM Alg. 1) in TrigFlow time
            d = velocity(x, t)
            x_euler = x + (t_next - t) * d
            x = x + (t_next - t) * 0.5 * (d + velocity(x_euler, t_next))
        elif solver == "dpm2s":
            x = _dpm2s_step(x, t, t_next, sigma_d, velocity, last)
        else:
            raise ValueError(f"sampler.teacher_solver: unknown {solver!r}; choose euler, heun or dpm2s")
    return x, nfe


def _dpm2s_step(x, t, t_next, sigma_d, velocity, last: bool):
    """DPM-Solver++(2S) with data prediction (Lu et al. 2022), in TrigFlow: alpha_t = cos t,
    sigma_t = sigma_d sin t, lambda_t = log(alpha_t / sigma_t); the midpoint halves lambda.
    The last step (to t = 0) is a single denoising evaluation."""

    def x0_pred(x_t, s):
        F = velocity(x_t, s) / sigma_d
        return consistency_fn(x_t, _full(s, x_t), F, sigma_d)

    if last:
        return x0_pred(x, t)
    lam = lambda s: math.log(math.cos(s) / (sigma_d * math.sin(s)))
    h = lam(t_next) - lam(t)
    lam_mid = lam(t) + 0.5 * h
    s = math.atan(1.0 / (sigma_d * math.exp(lam_mid)))  # invert lambda: tan s = 1 / (sigma_d e^lambda)
    x0_i = x0_pred(x, t)
    u = (math.sin(s) / math.sin(t)) * x - math.cos(s) * math.expm1(-0.5 * h) * x0_i
    x0_s = x0_pred(u, s)
    return (math.sin(t_next) / math.sin(t)) * x - math.cos(t_next) * math.expm1(-h) * x0_s
