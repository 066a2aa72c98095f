"""Exponential moving averages of the weights: by half-life, and EDM2's power function.

Half-life (the paper's CIFAR-10 runs, App. G): beta = 0.5 ** (batch / (halflife_kimg * 1000)), the half-life
optionally ramped up as rampup x images seen. Power function (EDM2, Karras et al. 2024, Eq. 3-4):
beta_t = (1 - 1/t) ** (gamma + 1) with t the step count and gamma chosen for a relative std sigma_rel.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from scm.config import EMAConfig


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Invert sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (EDM2, Eq. 3)."""
    t = sigma_rel**-2
    roots = np.roots([1, 7, 16 - t, 12 - t])
    return float(roots.real.max())


def power_function_beta(sigma_rel: float, step: int) -> float:
    gamma = sigma_rel_to_gamma(sigma_rel)
    return (1 - 1 / step) ** (gamma + 1) if step > 0 else 0.0


class EMA:
    """Keeps `model`, an averaged copy of a network (in eval mode, no gradients)."""

    def __init__(self, net: torch.nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.model = copy.deepcopy(net).eval().requires_grad_(False)

    def beta(self, cur_nimg: int, batch_size: int) -> float:
        cfg = self.cfg
        if cfg.kind == "none":
            return 0.0
        if cfg.kind == "power":
            return power_function_beta(cfg.sigma_rel, cur_nimg // batch_size)
        halflife_nimg = cfg.halflife_kimg * 1000
        if cfg.rampup > 0:
            halflife_nimg = min(halflife_nimg, cur_nimg * cfg.rampup)
        return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))

    @torch.no_grad()
    def update(self, net: torch.nn.Module, cur_nimg: int, batch_size: int) -> float:
        """Blend the network's current weights in; cur_nimg counts images after this step."""
        beta = self.beta(cur_nimg, batch_size)
        # One multi-tensor lerp over all parameters (the same per-tensor lerp, without a Python loop).
        ema_params = list(self.model.parameters())
        params = [p.detach().to(e.dtype) for e, p in zip(ema_params, net.parameters(), strict=True)]
        torch._foreach_lerp_(ema_params, params, 1 - beta)
        for b_ema, b in zip(self.model.buffers(), net.buffers(), strict=True):
            b_ema.copy_(b)
        return beta

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
