"""Losses against independent references: a Gaussian mixture's exact velocity and consistency function."""

import math

import pytest
import torch
from conftest import ExactConsistencyNet, ExactVelocityNet, ToyNet

from scm.config import LossConfig
from scm.losses import (
    ConsistencyLoss,
    DiffusionLoss,
    continuous_g,
    jvp_tangent,
    normalize_tangent,
    warmup_ratio,
)
from scm.trigflow import add_noise, consistency_fn

SD = 0.5


def _draw(gmm, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = gmm.sample(n, generator=g)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64) * SD
    t = 0.1 + (math.pi / 2 - 0.2) * torch.rand(n, generator=g, dtype=torch.float64)
    return x0, z, t


# ----------------------------------------------------------------------------
# (a) The exact velocity is a stationary point of the diffusion loss.


class _Perturbed(torch.nn.Module):
    """F = F_exact + (eps_i + bias) h(x, t), one eps per sample: d loss_i / d eps_i at eps = 0 is the test."""

    def __init__(self, gmm, bias, n):
        super().__init__()
        self.exact = ExactVelocityNet(gmm)
        self.eps = torch.nn.Parameter(torch.zeros(n, 1, dtype=torch.float64))
        self.bias = bias

    def forward(self, x, t, labels=None, guidance=None):
        h = torch.sin(3 * x) * torch.cos(t)[:, None] + 0.3
        return self.exact(x, t) + (self.eps + self.bias) * h

    def w_phi(self, t):
        return torch.zeros_like(t)


@pytest.mark.parametrize("bias,stationary", [(0.0, True), (0.1, False)])
def test_exact_velocity_is_stationary_for_diffusion_loss(gmm, bias, stationary):
    n = 200_000
    torch.manual_seed(0)
    net = _Perturbed(gmm, bias, n)
    loss_fn = DiffusionLoss(LossConfig(P_mean=-0.8, P_std=1.6, adaptive_weighting=False), SD)
    loss, _ = loss_fn(net, gmm.sample(n, generator=torch.Generator().manual_seed(3)))
    (d,) = torch.autograd.grad(loss.sum(), net.eps)  # per-sample derivatives
    mean, se = d.mean(), d.std() / math.sqrt(n)
    if stationary:  # E[h (sigma_d F* - v)] = 0 since F* = E[v | x_t] / sigma_d
        assert abs(mean) < 4 * se
    else:
        assert abs(mean) > 20 * se


# ----------------------------------------------------------------------------
# (b) With the exact velocity as teacher, the sCD tangent matches a finite difference of f- along the
# exact PF-ODE (an accurate RK4 solve), and vanishes for the exact consistency function.


@pytest.mark.parametrize("rearranged", [True, False])
def test_scd_tangent_matches_finite_difference_along_exact_ode(gmm, rearranged):
    x0, z, t = _draw(gmm, 16)
    x_t = add_noise(x0, z, t)
    net = ToyNet(4).double()
    loss = ConsistencyLoss(LossConfig(), SD, teacher=ExactVelocityNet(gmm))
    dxdt = loss.dxdt(x0, z, x_t, t, None, None)
    assert torch.allclose(dxdt, gmm.velocity(x_t, t), atol=1e-12)
    tan = jvp_tangent(net, x_t, t, dxdt, SD, rearranged=rearranged, impl="func")
    g = continuous_g(x_t, t, dxdt, tan, SD, r=1.0)
    # reference: cos(t) d/dt f-(x_t, t) along the ODE trajectory, central differences of RK4 solutions
    h = 1e-4

    def f_along(dt):
        x_s = gmm.ode(x_t, t, t + dt, steps=20)
        with torch.no_grad():
            return consistency_fn(x_s, t + dt, net(x_s / SD, t + dt), SD)

    fd = torch.cos(t)[:, None] * (f_along(h) - f_along(-h)) / (2 * h)
    assert (g - fd).norm() / fd.norm() < 1e-6


def test_tangent_vanishes_for_the_exact_consistency_function(gmm):
    x0, z, t = _draw(gmm, 8, seed=1)
    x_t = add_noise(x0, z, t)
    net = ExactConsistencyNet(gmm, steps=100)
    dxdt = gmm.velocity(x_t, t)
    tan = jvp_tangent(net, x_t, t, dxdt, SD, impl="func")
    g = continuous_g(x_t, t, dxdt, tan, SD, r=1.0)
    first_term = torch.cos(t)[:, None] ** 2 * (SD * tan.F_minus - dxdt)
    assert g.norm() < 1e-6 * first_term.norm()


# ----------------------------------------------------------------------------
# (c) The continuous-time gradient is the limit of the discrete-time consistency gradient.


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_discrete_time_gradient_converges_to_continuous(gmm, method):
    teacher = ExactVelocityNet(gmm) if method == "scd" else None
    x0 = gmm.sample(64, generator=torch.Generator().manual_seed(5))
    net = ToyNet(4).double()

    def grad(time, n=1024):
        cfg = LossConfig(time=time, discrete_steps=n, tangent_norm="none", adaptive_weighting=False,
                         tangent_warmup=False, jvp_impl="func")
        torch.manual_seed(7)  # the same t and z for every variant
        loss, _ = ConsistencyLoss(cfg, SD, teacher)(net, x0)
        params = [p for name, p in net.named_parameters() if not name.startswith("w.")]  # w_phi unused here
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss.mean(), params)])

    ref = grad("continuous")
    errs = [(grad("discrete", n) - ref).norm() / ref.norm() for n in (100, 1000, 10_000)]
    assert errs[2] < 2e-3
    assert errs[1] < errs[0] / 5 and errs[2] < errs[1] / 5  # first order in dt


# ----------------------------------------------------------------------------
# Each switch changes what it should.


def test_warmup_r0_removes_second_term(gmm):
    cfg = LossConfig(warmup_iters=100)
    assert warmup_ratio(cfg, 0) == 0.0 and warmup_ratio(cfg, 50) == 0.5 and warmup_ratio(cfg, 500) == 1.0
    assert warmup_ratio(LossConfig(tangent_warmup=False), 0) == 1.0
    x0, z, t = _draw(gmm, 8)
    x_t = add_noise(x0, z, t)
    net = ToyNet(4).double()
    dxdt = gmm.velocity(x_t, t)
    tan = jvp_tangent(net, x_t, t, dxdt, SD, impl="func")
    c = torch.cos(t)[:, None]
    assert torch.allclose(continuous_g(x_t, t, dxdt, tan, SD, r=0.0), -c**2 * (SD * tan.F_minus - dxdt))


def test_tangent_normalizations():
    g = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 10
    norm = g.flatten(1).norm(dim=1)
    l2 = normalize_tangent(g, "l2", 0.1)
    assert torch.allclose(l2.flatten(1).norm(dim=1), norm / (norm + 0.1))
    rms = normalize_tangent(g, "rms", 0.1)
    assert torch.allclose(rms.flatten(1).norm(dim=1), norm / (norm / math.sqrt(48) + 0.1))
    clip = normalize_tangent(g, "clip", 0.1)
    assert clip.abs().max() <= 1.0 and (clip.abs() == 1.0).any()
    assert torch.equal(normalize_tangent(g, "none", 0.1), g)


class _BigW(ToyNet):
    def w_phi(self, t):
        return torch.full_like(t, 3.0)


@pytest.mark.parametrize("adaptive", [True, False])
def test_adaptive_weighting_switch(gmm, adaptive):
    x0 = gmm.sample(32, generator=torch.Generator().manual_seed(0))
    net = _BigW(4).double()
    torch.manual_seed(0)
    loss, diag = ConsistencyLoss(LossConfig(adaptive_weighting=adaptive, jvp_impl="func"), SD)(net, x0)
    if adaptive:  # exp(w) * mse - w
        assert diag["w_mean"] == 3.0 and loss.mean().item() == pytest.approx(math.exp(3) * diag["mse"] - 3)
    else:  # w = 0: the loss is the plain mse
        assert diag["w_mean"] == 0.0 and loss.mean().item() == pytest.approx(diag["mse"])


def test_jvp_rearrangement_is_the_same_quantity_in_float64(gmm):
    x0, z, t = _draw(gmm, 8)
    x_t = add_noise(x0, z, t)
    net, dxdt = ToyNet(4).double(), gmm.velocity(x_t, t)
    a = jvp_tangent(net, x_t, t, dxdt, SD, rearranged=True, impl="func").cs_dF
    b = jvp_tangent(net, x_t, t, dxdt, SD, rearranged=False, impl="func").cs_dF
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_sct_and_scd_targets_differ_only_in_dxdt(gmm):
    x0, z, t = _draw(gmm, 8)
    x_t = add_noise(x0, z, t)
    sct = ConsistencyLoss(LossConfig(), SD).dxdt(x0, z, x_t, t, None, None)
    assert torch.allclose(sct, torch.cos(t)[:, None] * z - torch.sin(t)[:, None] * x0)
    scd = ConsistencyLoss(LossConfig(), SD, teacher=ExactVelocityNet(gmm)).dxdt(x0, z, x_t, t, None, None)
    assert not torch.allclose(sct, scd)


def test_cfg_teacher_mix():
    class LabelNet(torch.nn.Module):
        def forward(self, x, t, labels=None, guidance=None):
            return x * 0 + (0.0 if labels is None else 1.0)

    cfg = LossConfig(guidance_min=1.0, guidance_max=2.0)
    loss = ConsistencyLoss(cfg, SD, teacher=LabelNet())
    x = torch.zeros(4, 2)
    s = torch.tensor([1.0, 1.5, 2.0, 1.25])
    v = loss.teacher_velocity(x, torch.ones(4), torch.zeros(4, dtype=torch.long), s)
    assert torch.allclose(v[:, 0], SD * s)  # F_u + s (F_c - F_u) with F_u = 0, F_c = 1
    assert loss._guidance(x).min() >= 1.0


# ----------------------------------------------------------------------------
# The finite-difference JVP engine against the exact JVP on the U-Net (tS, dropout on, training mode).


def _unet(seed=0, dtype=torch.float64, dropout=0.1):
    """The 'shapes' tS U-Net in training mode; its zero-initialized gains set to 0.7 (else F = 0)."""
    from scm.config import resolve
    from scm.networks import build_network

    cfg = resolve("shapes", "tS", "scd", {"network.dropout": dropout})
    torch.manual_seed(seed)
    net = build_network(cfg.network, cfg.data, SD).to(dtype).train()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    return net


def _unet_inputs(dtype=torch.float64, B=2):
    g = torch.Generator().manual_seed(1)
    x_t = (torch.randn(B, 3, 16, 16, generator=g) * 0.8).to(dtype)
    dxdt = (torch.randn(B, 3, 16, 16, generator=g) * 0.5).to(dtype)
    return x_t, torch.linspace(0.3, 1.2, B, dtype=dtype), dxdt, torch.arange(B) % 8


@pytest.mark.parametrize("rearranged", [True, False])
def test_finite_difference_jvp_is_second_order_in_the_step(rearranged):
    torch.set_num_threads(1)
    net = _unet()
    x_t, t, dxdt, labels = _unet_inputs()

    def cs_dF(impl, h=1e-5):
        torch.manual_seed(5)  # the same dropout masks for every engine
        return jvp_tangent(net, x_t, t, dxdt, SD, labels, None, rearranged, impl, fd_step=h).cs_dF

    exact = cs_dF("manual")
    assert (cs_dF("func") - exact).norm() / exact.norm() < 1e-12  # the two exact engines agree
    steps = torch.tensor([0.08, 0.04, 0.02, 0.01], dtype=torch.float64)
    errs = torch.stack([(cs_dF("finite_difference", h.item()) - exact).norm() / exact.norm() for h in steps])
    # central difference: error ~ C h^2 until round-off; least-squares slope of log(err) against log(h)
    lh, le = steps.log(), errs.log()
    slope = ((lh - lh.mean()) * (le - le.mean())).sum() / ((lh - lh.mean()) ** 2).sum()
    assert abs(slope.item() - 2.0) < 0.1, (slope, errs)
    # the default step (~ cbrt of float64's epsilon) is below float32 rounding
    assert (cs_dF("finite_difference") - exact).norm() / exact.norm() < 1e-8


def test_finite_difference_scd_loss_and_gradient_match_manual():
    torch.set_num_threads(1)
    net, teacher = _unet(0, torch.float32), _unet(1, torch.float32).eval().requires_grad_(False)
    x0 = _unet_inputs(torch.float32, B=4)[0] * SD
    labels = torch.arange(4) % 8

    def loss_and_grad(impl):
        cfg = LossConfig(jvp_impl=impl, tangent_warmup=False)
        torch.manual_seed(3)  # the same t, z and dropout masks for both engines
        loss, _ = ConsistencyLoss(cfg, SD, teacher)(net, x0, labels)
        grads = torch.autograd.grad(loss.mean(), list(net.parameters()), allow_unused=True)
        return loss.detach(), torch.cat([g.flatten() for g in grads if g is not None])

    (loss_m, grad_m), (loss_fd, grad_fd) = loss_and_grad("manual"), loss_and_grad("finite_difference")
    assert torch.allclose(loss_fd, loss_m, rtol=1e-5, atol=1e-7)
    assert (grad_fd - grad_m).norm() / grad_m.norm() < 2e-5  # a step of 0.1 gives 1e-4
