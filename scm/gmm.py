"""A Gaussian-mixture data distribution with closed-form TrigFlow quantities.

x0 ~ sum_k pi_k N(mu_k, s_k^2 I), x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I). Then
x_t | k ~ N(cos(t) mu_k, var_k I) with var_k = cos^2(t) s_k^2 + sin^2(t) sigma_d^2, and the posterior
means of x0 and z are linear in x_t per component. These give the exact score, the exact PF-ODE
velocity E[v_t | x_t] and (by an accurate ODE solve) the exact consistency function: the independent
references of the tests.
"""

from __future__ import annotations

import math

import torch

from scm.trigflow import bcast


class GaussianMixture:
    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor, sigma_d: float = 0.5):
        self.means = means.double()  # (K, D)
        self.stds = stds.double()  # (K,)
        self.weights = weights.double() / weights.sum()  # (K,)
        self.sigma_d = sigma_d

    @classmethod
    def random(cls, K: int, D: int, seed: int = 0, sigma_d: float = 0.5) -> GaussianMixture:
        """Means spread so that the data std is about sigma_d; small per-component stds."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(K, D, generator=g, dtype=torch.float64) * 0.45
        stds = 0.05 + 0.1 * torch.rand(K, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(K, generator=g, dtype=torch.float64)
        return cls(means, stds, weights, sigma_d)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * eps

    # ------------------------------------------------------------------------
    # Per-component posterior quantities at time t (x: (B, D), t: (B,)).

    def _posterior(self, x: torch.Tensor, t: torch.Tensor):
        c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]  # (B, 1)
        var = c**2 * self.stds[None] ** 2 + s**2 * self.sigma_d**2  # (B, K)
        diff = x[:, None, :] - c[:, :, None] * self.means[None]  # (B, K, D)
        D = x.shape[1]
        # log N(x; c mu_k, var_k I) + log pi_k -> responsibilities r_k(x)
        logp = (-0.5 * (diff**2).sum(-1) / var - 0.5 * D * torch.log(2 * math.pi * var)
                + torch.log(self.weights)[None])
        r = torch.softmax(logp, dim=1)  # (B, K)
        return c, s, var, diff, r, logp

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(x) = sum_k r_k (-(x - cos t mu_k) / var_k)."""
        c, s, var, diff, r, _ = self._posterior(x, t)
        return (r[:, :, None] * (-diff / var[:, :, None])).sum(1)

    def log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self._posterior(x, t)[5], dim=1)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[v_t | x_t] with v_t = cos(t) z - sin(t) x0: the exact PF-ODE dx_t/dt."""
        c, s, var, diff, r, _ = self._posterior(x, t)
        v = var[:, :, None]
        x0_hat = self.means[None] + c[:, :, None] * self.stds[None, :, None] ** 2 / v * diff
        z_hat = s[:, :, None] * self.sigma_d**2 / v * diff
        return (r[:, :, None] * (c[:, :, None] * z_hat - s[:, :, None] * x0_hat)).sum(1)

    # ------------------------------------------------------------------------
    # The PF-ODE and the exact consistency function by RK4 in float64.

    def ode(self, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, steps: int = 400) -> torch.Tensor:
        """Integrate dx/dt = E[v_t | x_t] from t_from to t_to (per sample) with classic RK4."""
        x = x.double()
        t = t_from.double().clone()
        h = (t_to.double() - t) / steps
        for _ in range(steps):
            k1 = self.velocity(x, t)
            k2 = self.velocity(x + 0.5 * bcast(h, x) * k1, t + 0.5 * h)
            k3 = self.velocity(x + 0.5 * bcast(h, x) * k2, t + 0.5 * h)
            k4 = self.velocity(x + bcast(h, x) * k3, t + h)
            x = x + bcast(h, x) / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            t = t + h
        return x

    def consistency(self, x: torch.Tensor, t: torch.Tensor, steps: int = 400) -> torch.Tensor:
        """The exact consistency function f*(x_t, t): the ODE solution at t = 0."""
        return self.ode(x, t, torch.zeros_like(t), steps)
