"""Small stand-in networks with the scm network interface, for tests of losses and samplers."""

import math

import pytest
import torch

from scm.gmm import GaussianMixture


class ToyNet(torch.nn.Module):
    """F(x, t) = a smooth MLP of (x, t); w_phi(t) a linear head. Same call signature as SCMUNet."""

    def __init__(self, dim: int, hidden: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(dim + 1, hidden)
        self.l2 = torch.nn.Linear(hidden, dim)
        self.w = torch.nn.Linear(1, 1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5

    def forward(self, x, t, labels=None, guidance=None):
        shape = x.shape
        h = torch.cat([x.flatten(1), t[:, None].to(x.dtype)], dim=1)
        return self.l2(torch.tanh(self.l1(h))).reshape(shape)

    def w_phi(self, t):
        return self.w(t[:, None]).reshape(-1)


class ExactVelocityNet(torch.nn.Module):
    """F = E[v_t | x_t] / sigma_d for a Gaussian mixture: the exact teacher."""

    def __init__(self, gmm: GaussianMixture):
        super().__init__()
        self.gmm = gmm

    def forward(self, x, t, labels=None, guidance=None):
        sd = self.gmm.sigma_d
        x_t = x.flatten(1) * sd
        return (self.gmm.velocity(x_t.double(), t.double()) / sd).to(x.dtype).reshape(x.shape)

    def w_phi(self, t):
        return torch.zeros_like(t)


class ExactConsistencyNet(torch.nn.Module):
    """F from the exact consistency function: f* = cos t x - sin t sigma_d F (ODE solved by RK4)."""

    def __init__(self, gmm: GaussianMixture, steps: int = 200):
        super().__init__()
        self.gmm, self.steps = gmm, steps

    def forward(self, x, t, labels=None, guidance=None):
        sd = self.gmm.sigma_d
        x_t = x.flatten(1) * sd
        f = self.gmm.consistency(x_t, t, self.steps)
        c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
        return ((c * x_t - f) / (s * sd)).reshape(x.shape)

    def w_phi(self, t):
        return torch.zeros_like(t)


@pytest.fixture
def gmm():
    return GaussianMixture.random(K=3, D=4, seed=1, sigma_d=0.5)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


HALF_PI = math.pi / 2
