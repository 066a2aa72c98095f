"""A Gaussian-mixture data distribution with closed-form TrigFlow quantities.

x0 ~ sum_k pi_k N(mu_k, s_k^2 I), x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I). Then
x_t | k ~ N(cos(t) mu_k, var_k I) with var_k = cos^2(t) s_k^2 + sin^2(t) sigma_d^2, and the posterior
means of x0 and z are linear in x_t per component. These give the exact score, the exact PF-ODE
velocity E[v_t | x_t] and (by an accurate ODE solve) the exact consistency function: the independent
references of the tests.
"""

from __future__ import annotations

import math

import numpy as np
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

    @classmethod
    def for_data(cls, num_components: int, dim: int, seed: int = 0, sigma_d: float = 0.5,
                 shape: tuple[int, int, int] | None = None, mean_resolution: int = 0) -> GaussianMixture:
        """The 'gmm' dataset's mixture: unequal weights and widths, centred, per-dimension std sigma_d.

        means ~ N(0, I), relative stds ~ U[0.15, 0.4], weights ~ U[0.5, 1.5] (normalized), from (seed, 0);
        then one scale so that E[|x|^2] / D = sum_k w_k (|mu_k|^2 / D + s_k^2) = sigma_d^2 (App. B: unit
        data variance in units of sigma_d). With mean_resolution r > 0 and the image shape (C, H, W) of the
        D dimensions, each mean is drawn as a C x r x r image and upsampled to H x W by repetition (r = 1:
        flat-colour images), so that components differ in image structure a U-Net sees at a glance; the
        widths stay isotropic over all D dimensions.
        """
        rng = np.random.default_rng([seed, 0])
        if mean_resolution:
            C, H, W = shape
            if C * H * W != dim or H % mean_resolution or W % mean_resolution:
                raise ValueError(f"mean_resolution {mean_resolution} must divide the image sides of shape {shape} "
                                 f"of {dim} dimensions")
            low = rng.standard_normal((num_components, C, mean_resolution, mean_resolution))
            step = (H // mean_resolution, W // mean_resolution)
            means = low.repeat(step[0], axis=2).repeat(step[1], axis=3).reshape(num_components, dim)
        else:
            means = rng.standard_normal((num_components, dim))
        stds = rng.uniform(0.15, 0.4, num_components)
        weights = rng.uniform(0.5, 1.5, num_components)
        weights /= weights.sum()
        means -= weights @ means
        scale = sigma_d / math.sqrt(weights @ ((means**2).mean(axis=1) + stds**2))
        return cls(torch.from_numpy(means * scale), torch.from_numpy(stds * scale), torch.from_numpy(weights),
                   sigma_d)

    def to(self, device) -> GaussianMixture:
        """The same mixture with its parameters on `device`."""
        return GaussianMixture(self.means.to(device), self.stds.to(device), self.weights.to(device), self.sigma_d)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator=None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * eps

    # ------------------------------------------------------------------------
    # Per-component posterior quantities at time t (x: (B, D), t: (B,)).

    def _posterior(self, x: torch.Tensor, t: torch.Tensor):
        c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]  # (B, 1)
        var = c**2 * self.stds[None] ** 2 + s**2 * self.sigma_d**2  # (B, K)
        D = x.shape[1]
        # ||x - c mu_k||^2 through inner products: no (B, K, D) temporaries
        sq = (x**2).sum(1, keepdim=True) - 2 * c * (x @ self.means.T) + c**2 * (self.means**2).sum(1)[None]
        # log N(x; c mu_k, var_k I) + log pi_k -> responsibilities r_k(x)
        logp = -0.5 * sq / var - 0.5 * D * torch.log(2 * math.pi * var) + torch.log(self.weights)[None]
        r = torch.softmax(logp, dim=1)  # (B, K)
        return c, s, var, r, logp

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(x) = sum_k r_k (-(x - cos t mu_k) / var_k)."""
        c, s, var, r, _ = self._posterior(x, t)
        q = r / var
        return -q.sum(1, keepdim=True) * x + c * (q @ self.means)

    def log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self._posterior(x, t)[4], dim=1)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[v_t | x_t] with v_t = cos(t) z - sin(t) x0: the exact PF-ODE dx_t/dt.

        Per component, E[x0 | x_t, k] = mu_k + c s_k^2 / var_k (x - c mu_k) and
        E[z | x_t, k] = s sigma_d^2 / var_k (x - c mu_k), so c E[z] - s E[x0] = a_k x - (a_k c + s) mu_k
        with a_k = c s (sigma_d^2 - s_k^2) / var_k; then mix with the responsibilities r_k.
        """
        c, s, var, r, _ = self._posterior(x, t)
        a = c * s * (self.sigma_d**2 - self.stds[None] ** 2) / var  # (B, K)
        return (r * a).sum(1, keepdim=True) * x - (r * (a * c + s)) @ self.means

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

    def trajectory(self, x: torch.Tensor, times: list[float], steps: int = 400) -> list[torch.Tensor]:
        """States of one PF-ODE solve from times[0] (where the state is x) through decreasing times.

        RK4 with about `steps` steps over [0, times[0]], split across the intervals in proportion to their
        length; returns [x at times[0], x at times[1], ...] in float64.
        """
        if any(b > a for a, b in zip(times[:-1], times[1:])) or times[-1] < 0:
            raise ValueError(f"trajectory times must decrease and stay >= 0, got {times}")
        out = [x.double()]
        for a, b in zip(times[:-1], times[1:]):
            n = max(1, round(steps * (a - b) / times[0]))
            ta = torch.full((x.shape[0],), a, dtype=torch.float64)
            out.append(self.ode(out[-1], ta, torch.full_like(ta, b), n))
        return out

    def component_of(self, x0: torch.Tensor) -> torch.Tensor:
        """Most likely component of each data point (posterior argmax at t = 0): mode assignment."""
        t = torch.zeros(x0.shape[0], dtype=torch.float64)
        return self._posterior(x0.double().flatten(1), t)[3].argmax(1)
