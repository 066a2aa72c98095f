"""Training objectives: the TrigFlow teacher, sCT and sCD (Lu & Song 2024, Sec. 3-4, Alg. 1).

All three share one call signature:

    loss, diag = loss_fn(net, x0, labels=None, step=0)

returning per-sample losses (B,) and a dict of scalar diagnostics (loss parts, ||g||, ...).
`net(x_t / sigma_d, t, labels, guidance) -> F` is the network; `net.w_phi(t)` its adaptive-weighting
head; `net.forward_with_tangent(x, t, tx, tt, labels, guidance) -> (F, dF)` its hand-propagated JVP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from scm.config import LossConfig
from scm.trigflow import add_noise, bcast, consistency_fn, sample_t, velocity_target


def _sample_noise(x0: torch.Tensor, cfg: LossConfig, sigma_d: float):
    """Time from the log-normal proposal and noise z ~ N(0, sigma_d^2 I)."""
    t = sample_t(x0.shape[0], cfg.P_mean, cfg.P_std, sigma_d, device=x0.device, dtype=x0.dtype)
    z = torch.randn_like(x0) * sigma_d
    return t, z


def _mean_over_data(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dims: ||.||^2 / D per sample."""
    return x.flatten(1).mean(1)


def _weighted(mse: torch.Tensor, net, t: torch.Tensor, adaptive: bool):
    """exp(w_phi(t)) * mse - w_phi(t) (adaptive weighting, Alg. 1); w = 0 when off."""
    if not adaptive:
        return mse, torch.zeros_like(mse)
    w = net.w_phi(t).to(mse.dtype).reshape(-1)
    return torch.exp(w) * mse - w, w


def _unwrap(net):
    return getattr(net, "module", net)


# ----------------------------------------------------------------------------
# The teacher: v-prediction with EDM2's weighting and learned uncertainty (sCM Sec. 3; EDM2 Sec. 5).


class DiffusionLoss:
    def __init__(self, cfg: LossConfig, sigma_d: float):
        self.cfg, self.sigma_d = cfg, sigma_d

    def __call__(self, net, x0, labels=None, step: int = 0):
        t, z = _sample_noise(x0, self.cfg, self.sigma_d)
        x_t = add_noise(x0, z, t)
        F = net(x_t / self.sigma_d, t, labels, None)
        # ||sigma_d F - v_t||^2 / sigma_d^2 equals EDM2's lambda(sigma)-weighted denoiser loss
        mse = _mean_over_data((self.sigma_d * F - velocity_target(x0, z, t)) ** 2) / self.sigma_d**2
        loss, w = _weighted(mse, _unwrap(net), t, self.cfg.adaptive_weighting)
        return loss, {"loss": loss.mean().item(), "mse": mse.mean().item(), "w_mean": w.mean().item()}


# ----------------------------------------------------------------------------
# The tangent df-/dt (Eq. 7) via a JVP, and its normalized form g (Alg. 1).


@dataclass
class Tangent:
    F_theta: torch.Tensor  # F_theta(x_t / sigma_d, t) with the autograd graph
    F_minus: torch.Tensor  # the same values, stop-gradient
    cs_dF: torch.Tensor  # cos(t) sin(t) sigma_d dF-/dt (detached)
    extras: dict = field(default_factory=dict)


def jvp_tangent(net, x_t, t, dxdt, sigma_d, labels=None, guidance=None,
                rearranged: bool = True, impl: str = "manual", fd_step: float = LossConfig.jvp_fd_step) -> Tangent:
    """F_theta, F- and cos(t) sin(t) sigma_d dF-/dt along the PF-ODE direction dx_t/dt.

    Rearranged (FP16-safe, sCM Sec. 5.1): tangents (cos t sin t dx_t/dt, cos t sin t sigma_d) on the
    inputs (x_t / sigma_d, t) give cos t sin t sigma_d dF/dt directly. Otherwise tangents
    (dx_t/dt / sigma_d, 1) give dF/dt, scaled afterwards.
    impl: manual (net.forward_with_tangent), func (torch.func.jvp) or finite_difference (a central
    difference along the same tangents, see _finite_difference_jvp; fd_step is its step h).
    """
    x_in = x_t / sigma_d
    cs = torch.cos(t) * torch.sin(t)
    if rearranged:
        tx, tt = bcast(cs, x_t) * dxdt, cs * sigma_d
    else:
        tx, tt = dxdt / sigma_d, torch.ones_like(t)
    base = _unwrap(net)
    if impl == "finite_difference":
        dF = _finite_difference_jvp(base, x_in, t, tx, tt, labels, guidance, fd_step)
        F_theta = net(x_in, t, labels, guidance)  # same RNG state as the two evaluations: same dropout masks
    elif impl == "manual" and hasattr(base, "forward_with_tangent"):
        # One pass: the primal keeps its graph for the gradient pass; same dropout masks by construction.
        F_theta, dF = net(x_in, t, labels, guidance, tangents=(tx, tt))
    else:
        # torch.func.jvp, then a second forward with the same RNG state (same dropout masks).
        devices = [x_t.device] if x_t.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            with torch.no_grad():
                _, dF = torch.func.jvp(lambda x, s: base(x, s, labels, guidance), (x_in, t), (tx, tt))
        F_theta = net(x_in, t, labels, guidance)
    dF = dF.detach()
    cs_dF = dF if rearranged else bcast(cs, dF) * sigma_d * dF
    return Tangent(F_theta, F_theta.detach(), cs_dF)


def _finite_difference_jvp(base, x_in, t, tx, tt, labels, guidance, h: float) -> torch.Tensor:
    """dF-[x, t](tx, tt) ~ (F(x + h_i tx, t + h_i tt) - F(x - h_i tx, t - h_i tt)) / (2 h_i), in float64.

    A JVP without forward-mode AD (any attention kernel, sharded data parallelism), standing in for the
    exact JVP of Alg. 1: the tangent structure, hence the loss, is unchanged up to O(h^2). Per sample, h_i
    makes the perturbation's RMS over the D + 1 inputs equal h, so the relative accuracy does not depend on
    the tangent's scale. With the JVP rearrangement (Sec. 5.1) the tangents are (cos t sin t dx_t/dt,
    cos t sin t sigma_d): the quotient is cos t sin t sigma_d dF-/dt itself, and the step in t shrinks
    like cos t sin t near t = 0 and pi/2, where c_noise = log(sigma_d tan t) is steep; without it the
    quotient is dF-/dt, scaled afterwards as for the exact JVP. Float64 throughout (autocast off): the
    central difference's error, ~ h^2 |d^3F| + 1e-16 |F| / h, stays far below float32 rounding.
    """
    # Stop-gradient float64 copies, fresh for each evaluation: a training-mode forward re-normalizes the
    # MP weights in place (EDM2's forced weight normalization), so both evaluations see the stored weights.
    def weights():
        out = {name: p.detach().double() for name, p in base.named_parameters()}
        out.update({name: b.double() if b.is_floating_point() else b for name, b in base.named_buffers()})
        return out

    x64, t64 = x_in.detach().double(), t.detach().double()
    tx64, tt64 = tx.detach().double(), tt.detach().double().expand(t64.shape)
    rms = ((tx64.flatten(1).square().sum(1) + tt64.square()) / (tx64[0].numel() + 1)).sqrt()
    h_i = h / rms.clamp_min(torch.finfo(torch.float64).tiny)
    g = None if guidance is None else guidance.detach().double()
    devices = [x_in.device] if x_in.device.type == "cuda" else []

    def F_at(sign: float) -> torch.Tensor:
        # Each evaluation starts from the caller's RNG state: the same dropout masks as F_theta.
        with torch.random.fork_rng(devices=devices), torch.no_grad(), \
                torch.autocast(x_in.device.type, enabled=False):
            x = x64 + sign * bcast(h_i, x64) * tx64
            return torch.func.functional_call(base, weights(), (x, t64 + sign * h_i * tt64, labels, g))

    dF = (F_at(1.0) - F_at(-1.0)) / (2 * bcast(h_i, x64))
    return dF.to(x_in.dtype)


def normalize_tangent(g: torch.Tensor, kind: str, c: float) -> torch.Tensor:
    """Tangent normalization g / (||g|| + c): plain L2 over non-batch dims (l2) or RMS (rms); clip; none."""
    if kind == "none":
        return g
    if kind == "clip":
        return g.clamp(-1.0, 1.0)
    norm = g.flatten(1).norm(dim=1)
    if kind == "rms":
        norm = norm / math.sqrt(g[0].numel())
    elif kind != "l2":
        raise ValueError(f"loss.tangent_norm: unknown {kind!r}; choose l2, rms, clip or none")
    return g / bcast(norm + c, g)


def warmup_ratio(cfg: LossConfig, step: int) -> float:
    """Tangent warmup r = min(1, step / H); r = 1 from step 0 when off."""
    if not cfg.tangent_warmup or cfg.warmup_iters <= 0:
        return 1.0
    return min(1.0, step / cfg.warmup_iters)


def continuous_g(x_t, t, dxdt, tan: Tangent, sigma_d: float, r: float) -> torch.Tensor:
    """g = -cos^2(t) (sigma_d F- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF-/dt)  (Alg. 1).

    Equals cos(t) df-/dt (Eq. 7) at r = 1: the prior weighting w(t) = 1 / (sigma_d tan t) folded in.
    """
    c, s = torch.cos(bcast(t, x_t)), torch.sin(bcast(t, x_t))
    return -c**2 * (sigma_d * tan.F_minus - dxdt) - r * (c * s * x_t + tan.cs_dF)


# ----------------------------------------------------------------------------
# sCT and sCD: the same loss, different dx_t/dt (Sec. 4).


class ConsistencyLoss:
    """sCT when teacher is None (dx_t/dt = cos t z - sin t x0); sCD otherwise (teacher's PF-ODE).

    on_tangent (optional): called with every continuous-time step's Tangent, before it enters g; an
    observer only (e.g. counting non-finite cs_dF under fp16), the loss does not depend on it.
    """

    def __init__(self, cfg: LossConfig, sigma_d: float, teacher=None, on_tangent=None):
        self.cfg, self.sigma_d, self.teacher = cfg, sigma_d, teacher
        self.on_tangent = on_tangent

    # Guidance scale per sample, s ~ U[guidance_min, guidance_max] (CFG distillation, sCM App. G).
    def _guidance(self, x0):
        lo, hi = self.cfg.guidance_min, self.cfg.guidance_max
        if self.teacher is None or (hi <= 1.0 and lo >= 1.0):
            return None
        return lo + (hi - lo) * torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype)

    @torch.no_grad()
    def teacher_velocity(self, x_t, t, labels, guidance):
        """dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t), the CFG mix F_u + s (F_c - F_u) when guided."""
        x_in = x_t / self.sigma_d
        F = self.teacher(x_in, t, labels, None)
        if guidance is not None and labels is not None:
            F_u = self.teacher(x_in, t, None, None)
            F = F_u + bcast(guidance, F) * (F - F_u)
        return self.sigma_d * F

    def dxdt(self, x0, z, x_t, t, labels, guidance):
        if self.teacher is None:
            return velocity_target(x0, z, t)
        return self.teacher_velocity(x_t, t, labels, guidance)

    def __call__(self, net, x0, labels=None, step: int = 0):
        cfg, sigma_d = self.cfg, self.sigma_d
        t, z = _sample_noise(x0, cfg, sigma_d)
        x_t = add_noise(x0, z, t)
        guidance = self._guidance(x0)
        dxdt = self.dxdt(x0, z, x_t, t, labels, guidance)
        r = warmup_ratio(cfg, step)
        if cfg.time == "continuous":
            tan = jvp_tangent(net, x_t, t, dxdt, sigma_d, labels, guidance, cfg.jvp_rearrangement, cfg.jvp_impl,
                              cfg.jvp_fd_step)
            if self.on_tangent is not None:
                self.on_tangent(tan)
            g = continuous_g(x_t, t, dxdt, tan, sigma_d, r)
        else:
            tan, g = self._discrete(net, x0, z, x_t, t, dxdt, labels, guidance)
        g_norm = g.flatten(1).norm(dim=1)
        g = normalize_tangent(g, cfg.tangent_norm, cfg.tangent_norm_c)
        # Alg. 1: exp(w)/D ||F_theta - F- - g||^2 - w
        mse = _mean_over_data((tan.F_theta - tan.F_minus - g) ** 2)
        loss, w = _weighted(mse, _unwrap(net), t, cfg.adaptive_weighting)
        diag = {"loss": loss.mean().item(), "mse": mse.mean().item(), "w_mean": w.mean().item(),
                "g_norm": g_norm.mean().item(), "g_norm_max": g_norm.max().item(), "r": r}
        return loss, diag

    def _discrete(self, net, x0, z, x_t, t, dxdt, labels, guidance):
        """Discrete-time CM (App. E): g = cos(t) (f-(x_t, t) - f-(x_t', t')) / dt with dt = (pi/2) / N.

        x_t' is on the same noise path (sCT) or one Euler step of the teacher's PF-ODE (sCD). Tangent
        warmup has no second term to scale here and is not applied.
        """
        sigma_d = self.sigma_d
        t_prev = (t - (math.pi / 2) / self.cfg.discrete_steps).clamp(min=0.0)
        dt = t - t_prev
        if self.teacher is None:
            x_prev = add_noise(x0, z, t_prev)
        else:
            x_prev = x_t - bcast(dt, x_t) * dxdt
        devices = [x_t.device] if x_t.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # same dropout masks for both evaluations
            with torch.no_grad():
                F_prev = _unwrap(net)(x_prev / sigma_d, t_prev, labels, guidance)
        F_theta = net(x_t / sigma_d, t, labels, guidance)
        F_minus = F_theta.detach()
        df = (consistency_fn(x_t, t, F_minus, sigma_d) - consistency_fn(x_prev, t_prev, F_prev, sigma_d))
        g = bcast(torch.cos(t) / dt, x_t) * df
        return Tangent(F_theta, F_minus, torch.zeros_like(F_minus)), g


def build_loss(method: str, cfg: LossConfig, sigma_d: float, teacher=None):
    """The objective for run.method: teacher -> DiffusionLoss; sct -> ConsistencyLoss; scd -> with teacher."""
    if method == "teacher":
        return DiffusionLoss(cfg, sigma_d)
    if method == "sct":
        return ConsistencyLoss(cfg, sigma_d)
    if method == "scd":
        if teacher is None:
            raise ValueError("sCD needs a teacher network (run.teacher_run_dir)")
        return ConsistencyLoss(cfg, sigma_d, teacher)
    raise ValueError(f"run.method: unknown {method!r}; choose teacher, sct or scd")
