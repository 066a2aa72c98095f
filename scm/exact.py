"""The exact-answer study: sCM runs on a Gaussian mixture scored against the true consistency function.

For a mixture the PF-ODE velocity is known in closed form (scm.gmm), so the exact consistency function
Phi(x_T) = f*(x_T, T) is an accurate ODE solve away (Lu & Song 2024, Sec. 3-4; Eq. 7's f*). This module
holds the exact answers the study scores against:

- the exact teacher: F_teacher = E[v_t | x_t] / sigma_d, a network without weights (sCD from a perfect
  teacher; `run.teacher_run_dir = "exact:data"`);
- the reference of fixed evaluation noises: exact ODE states at T and a few intermediate t, Phi, true
  samples for the distribution metrics and their floors;
- the exact metrics: one-step error ||f_theta(x_t, t) - Phi||, 2-step sliced Wasserstein distance, mode
  coverage (recovered mixture weights);
The study grid and its jobs are in scm.exact_study; tables and figures in scm.exact_report.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from scm.config import Config, ConfigError, apply_override, flatten
from scm.gmm import GaussianMixture
from scm.trigflow import consistency_fn, sigma_to_t

log = logging.getLogger(__name__)

EXACT_PREFIX = "exact:"


# ----------------------------------------------------------------------------
# The exact teacher (sCD from a perfect teacher).


def mixture_of(cfg: Config) -> GaussianMixture:
    """The mixture a 'gmm' run trains on (the same parameters as scm.data.GMMDataset)."""
    if cfg.data.name != "gmm":
        raise ConfigError(f"data.name: the exact teacher needs data.name='gmm', got {cfg.data.name!r}")
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    return GaussianMixture.for_data(cfg.data.gmm_components, math.prod(shape), cfg.data.gmm_seed, cfg.sigma_d,
                                    shape, cfg.data.gmm_mean_resolution)


class ExactVelocityNet(torch.nn.Module):
    """F(x_t / sigma_d, t) = E[v_t | x_t] / sigma_d: the network convention of scm.networks.SCMUNet.

    With it, sigma_d F(x_t / sigma_d, t) is the exact PF-ODE dx_t/dt (TrigFlow, Sec. 3). Computed in
    float64, returned in the input's dtype. No parameters: w_phi is 0.
    """

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x, t, labels=None, guidance=None):
        sd = self.mixture.sigma_d
        t = t.reshape(-1).expand(x.shape[0]).double()
        F = self.mixture.velocity(x.flatten(1).double() * sd, t) / sd
        return F.to(x.dtype).reshape(x.shape)

    def w_phi(self, t):
        return torch.zeros_like(t).reshape(-1)


class ExactConsistencyNet(torch.nn.Module):
    """F from the exact consistency function: f* = cos t x_t - sin t sigma_d F, i.e. the perfect student."""

    def __init__(self, mixture: GaussianMixture, ode_steps: int = 400):
        super().__init__()
        self.mixture, self.ode_steps = mixture, ode_steps

    def forward(self, x, t, labels=None, guidance=None):
        sd = self.mixture.sigma_d
        t = t.reshape(-1).expand(x.shape[0]).double()
        x_t = x.flatten(1).double() * sd
        f = self.mixture.consistency(x_t, t, self.ode_steps)
        c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
        return ((c * x_t - f) / (s * sd)).to(x.dtype).reshape(x.shape)

    def w_phi(self, t):
        return torch.zeros_like(t).reshape(-1)


def exact_teacher(spec: str, cfg: Config, device) -> torch.nn.Module:
    """The sCD teacher named by run.teacher_run_dir = 'exact:<spec>'; spec 'data' = the run's own mixture."""
    if spec != "data":
        raise ConfigError(f"run.teacher_run_dir: unknown exact teacher {EXACT_PREFIX + spec!r}; "
                          f"use '{EXACT_PREFIX}data' (the exact velocity of the run's mixture)")
    mixture = mixture_of(cfg)
    return ExactVelocityNet(mixture.to(device)).eval()


# ----------------------------------------------------------------------------
# The reference: fixed evaluation noises and what the exact ODE makes of them.


def t_max(sigma_d: float, sigma_max: float = 80.0) -> float:
    """Where 1-step sampling starts: t_max = arctan(sigma_max / sigma_d) (Sec. 5.2)."""
    return sigma_to_t(sigma_max, sigma_d)


def build_reference(mixture: GaussianMixture, num: int, times: list[float], seed: int = 0,
                    ode_steps: int = 400) -> dict[str, Any]:
    """Fixed noises z, the exact PF-ODE states x_t at `times` (times[0] = T, x_T = sigma_d z), Phi = the
    state at t = 0, second-step noises z' (2-step sampling), two independent sets of true samples."""
    g = torch.Generator().manual_seed(seed)
    D = mixture.dim
    noise = torch.randn(num, D, generator=g, dtype=torch.float64)
    noise2 = torch.randn(num, D, generator=g, dtype=torch.float64)
    data_a, data_b = mixture.sample(num, generator=g), mixture.sample(num, generator=g)
    states = mixture.trajectory(mixture.sigma_d * noise, list(times) + [0.0], ode_steps)
    return {"times": list(times), "noise": noise, "noise2": noise2, "states": torch.stack(states[:-1]),
            "target": states[-1], "data_a": data_a, "data_b": data_b, "seed": seed, "ode_steps": ode_steps}


def euler_one_step(mixture: GaussianMixture, x_T: torch.Tensor, T: float) -> torch.Tensor:
    """One Euler step of the exact PF-ODE from T to 0: x_T - T dx_t/dt (the baseline a CM must beat)."""
    t = torch.full((x_T.shape[0],), T, dtype=torch.float64)
    return x_T - T * mixture.velocity(x_T, t)


# ----------------------------------------------------------------------------
# The exact metrics.


def mean_error(x: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over samples of the L2 distance ||x - target|| (over all D dimensions)."""
    return float((x.double().flatten(1) - target.double().flatten(1)).norm(dim=1).mean())


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random unit directions of W2^2 in 1-D
    (sorted projections; equal sample sizes). Fixed directions per seed."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein: needs equal sample sizes, got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=0, keepdim=True)
    pa, pb = (a @ u).sort(dim=0).values, (b @ u).sort(dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mode_weights(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Fraction of samples assigned to each component (posterior argmax at t = 0)."""
    k = mixture.component_of(x)
    return torch.bincount(k, minlength=len(mixture.weights)).double() / len(k)


def coverage_tv(mixture: GaussianMixture, x: torch.Tensor) -> float:
    """Total variation between recovered and true mixture weights: 0.5 sum_k |w_hat_k - w_k|."""
    return float(0.5 * (mode_weights(mixture, x) - mixture.weights).abs().sum())


def floors(mixture: GaussianMixture, ref: dict, projections: int = 256) -> dict[str, float]:
    """What the metrics give without any model error: true vs true samples, and the 1-step baselines
    (one Euler step, the identity map, and the data mean for every noise: what a CM computes at init,
    F = 0 giving f = cos(T) x_T ~ 0)."""
    T = ref["times"][0]
    x_T = ref["states"][0]
    data_mean = (mixture.weights @ mixture.means).expand_as(ref["target"])
    return {"sw_floor": sliced_wasserstein(ref["data_b"], ref["data_a"], projections),
            "tv_floor": coverage_tv(mixture, ref["data_b"]),
            "err_euler": mean_error(euler_one_step(mixture, x_T, T), ref["target"]),
            "err_identity": mean_error(x_T, ref["target"]),
            "err_mean": mean_error(data_mean, ref["target"])}


def _consistency(net, x_t: torch.Tensor, t: float, sigma_d: float, shape) -> torch.Tensor:
    """f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta(x_t / sigma_d, t) (TrigFlow, Sec. 3), float64 (B, D)."""
    dtype = _dtype_of(net)
    x = x_t.to(dtype).reshape(-1, *shape)
    tt = torch.full((x.shape[0],), float(t), dtype=dtype)
    return consistency_fn(x, tt, net(x / sigma_d, tt, None, None), sigma_d).double().flatten(1)


@torch.no_grad()
def one_step_errors(net, ref: dict, sigma_d: float, num: int | None = None, times: int | None = None) -> list[float]:
    """Mean ||f_theta(x_t, t) - Phi|| at the reference times (the first `times` of them; all by default),
    x_t on the exact ODE path of the same noise, over the first `num` noises (all by default)."""
    shape = _shape_of(net, ref)
    return [mean_error(_consistency(net, ref["states"][i][:num], t, sigma_d, shape), ref["target"][:num])
            for i, t in enumerate(ref["times"][:times])]


@torch.no_grad()
def evaluate(net, mixture: GaussianMixture, ref: dict, sigma_d: float, projections: int = 256,
             t_mid: float = 1.1) -> dict[str, Any]:
    """Every exact metric of one network, from the reference's fixed noises (deterministic)."""
    shape = _shape_of(net, ref)
    # 1 step: f(sigma_d z, T) (Sec. 5.2), the same network call as the one-step error at T (x_T = sigma_d z)
    x0 = _consistency(net, ref["states"][0], ref["times"][0], sigma_d, shape)
    errs = [mean_error(x0, ref["target"])]
    errs += [mean_error(_consistency(net, ref["states"][i], t, sigma_d, shape), ref["target"])
             for i, t in enumerate(ref["times"]) if i > 0]
    # 2 steps through t_mid = 1.1 with the fixed second noise z' (Sec. 5.2)
    x_mid = math.cos(t_mid) * x0 + math.sin(t_mid) * sigma_d * ref["noise2"]
    two = _consistency(net, x_mid, t_mid, sigma_d, shape)
    return {"times": list(ref["times"]), "err": errs, "err_T": errs[0],
            "sw_1step": sliced_wasserstein(x0, ref["data_a"], projections),
            "sw_2step": sliced_wasserstein(two, ref["data_a"], projections),
            "tv_1step": coverage_tv(mixture, x0), "tv_2step": coverage_tv(mixture, two),
            "weights_2step": mode_weights(mixture, two).tolist()}


def _shape_of(net, ref) -> tuple[int, ...]:
    res, ch = getattr(net, "img_resolution", None), getattr(net, "img_channels", None)
    return (ch, res, res) if res else (ref["noise"].shape[1],)


def _dtype_of(net) -> torch.dtype:
    p = next(iter(net.parameters()), None)
    return p.dtype if p is not None else torch.float64


def save_reference(ref: dict, path: str | Path) -> None:
    from scm.checkpoint import save_checkpoint

    save_checkpoint(Path(path), ref)


def load_reference(path: str | Path) -> dict:
    from scm.checkpoint import load_checkpoint

    return load_checkpoint(Path(path))


def reference_from_spec(spec: dict[str, Any]) -> tuple[dict, dict]:
    """The reference of a study (what `scm exact reference` writes) and its floors."""
    cfg = Config()
    for key, value in flatten({"data": spec["data"]}).items():
        apply_override(cfg, key, value)
    cfg.sigma_d = spec["sigma_d"]
    mixture = mixture_of(cfg)
    ref = build_reference(mixture, spec["num"], spec["times"], spec["seed"], spec["ode_steps"])
    return ref, floors(mixture, ref, spec["sw_projections"])
