"""The faster training step computes what the previous code computed: each rewritten piece against the
previous implementation (kept here as the reference) or against torch's own op, to float tolerance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scm.config import EMAConfig, OptimConfig, resolve
from scm.ema import EMA
from scm.networks import Block, MPConv, build_network, group_norm, mp_silu, normalize, normalize_
from scm.train import _optimizer, grad_norm_and_clip


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------
# The previous implementations (reference).


def old_group_norm(x, tx, groups, eps=1e-5):
    y = F.group_norm(x, groups, eps=eps)
    B = x.shape[0]
    sigma = (x.reshape(B, groups, -1).var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    yg, tg = y.reshape(B, groups, -1), tx.reshape(B, groups, -1)
    return y, ((tg - tg.mean(-1, keepdim=True) - yg * (yg * tg).mean(-1, keepdim=True)) / sigma).reshape(x.shape)


def old_mp_silu_tangent(x, tx):
    s = torch.sigmoid(x)
    return tx * (s * (1 + x * (1 - s)) / 0.596)


def old_modulate(y, ty, S, tS, B, tB):
    pc = lambda z: z[:, :, None, None] if torch.is_tensor(z) else z
    return y * pc(S) + pc(B), ty * pc(S) + y * pc(tS) + pc(tB)


# ----------------------------------------------------------------------------
# Network primitives.


def test_group_norm_tangent_matches_previous_and_forward_mode_ad():
    x, tx = _randn(4, 12, 8, 8, seed=1), _randn(4, 12, 8, 8, seed=2)
    y, ty = group_norm(x, tx, 3)
    y_old, ty_old = old_group_norm(x, tx, 3)
    _, ty_ad = torch.func.jvp(lambda z: F.group_norm(z, 3, eps=1e-5), (x,), (tx,))
    torch.testing.assert_close(y, y_old, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ty, ty_old, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ty, ty_ad, rtol=1e-10, atol=1e-10)
    # the value keeps its graph: the same gradient as F.group_norm
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad((group_norm(xg, tx, 3)[0] * tx).sum(), xg)
    (g_ref,) = torch.autograd.grad((F.group_norm(xg, 3, eps=1e-5) * tx).sum(), xg)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_mp_silu_tangent_matches_previous():
    x, tx = _randn(3, 5, 4, 4, seed=3) * 4, _randn(3, 5, 4, 4, seed=4)
    torch.testing.assert_close(mp_silu(x, tx)[1], old_mp_silu_tangent(x, tx), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(mp_silu(x.float(), tx.float())[1], old_mp_silu_tangent(x.float(), tx.float()),
                               rtol=1e-6, atol=1e-6)


def test_in_place_normalize_is_bitwise_normalize():
    w = _randn(8, 5, 3, 3, seed=5, dtype=torch.float32) * 3
    assert torch.equal(normalize_(w.clone()), normalize(w))


def _block(modulation, clip_act=256.0):
    cfg = resolve("shapes", "tS", "teacher").network
    torch.manual_seed(0)
    blk = Block(12, 12, 16, "dec", cfg, modulation).double().eval()
    with torch.no_grad():
        for p in blk.parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    blk.clip_act = clip_act
    return blk


@pytest.mark.parametrize("modulation", ["double", "plain", "edm2"])
def test_modulation_matches_previous(modulation):
    blk = _block(modulation)
    y, ty = _randn(2, 12, 4, 4, seed=6), _randn(2, 12, 4, 4, seed=7)
    e, te = _randn(2, 16, seed=8), _randn(2, 16, seed=9)
    out, tout = blk._modulate(y, ty, (e, te))
    # previous: S, B and their tangents from the same layers, then y S + B and the product rule
    yn, tyn = (y, ty) if modulation == "edm2" else old_group_norm(y, ty, blk.groups)
    if modulation == "double":
        from scm.networks import pixel_norm

        S, tS = pixel_norm(*blk.emb_linear(e, te))
        B, tB = pixel_norm(*blk.emb_linear_shift(e, te))
    else:
        s, tS = blk.emb_linear(e, te, gain=blk.emb_gain)
        S = 1 + s
        B, tB = blk.emb_linear_shift(e, te, gain=blk.shift_gain) if modulation == "plain" else (0, 0)
    ref, tref = old_modulate(yn, tyn, S, tS, B, tB)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tout, tref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("clip_act", [256.0, 0.5])  # 256: nothing clipped (skipped on the CPU); 0.5: clipped
def test_block_clipping_matches_clamp(clip_act):
    blk = _block("double", clip_act)
    x, tx = _randn(2, 12, 4, 4, seed=10), _randn(2, 12, 4, 4, seed=11)
    emb = (_randn(2, 16, seed=12), _randn(2, 16, seed=13))
    blk.clip_act = math.inf  # the unclipped output, as reference
    x_ref, tx_ref = blk(x, tx, emb)
    blk.clip_act = clip_act
    xg = x.clone().requires_grad_()
    out, tout = blk(xg, tx, emb)
    inside = x_ref.abs() <= clip_act
    assert (not inside.all()) == (clip_act < 1)  # the clipped case really clips
    torch.testing.assert_close(out, x_ref.clamp(-clip_act, clip_act), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tout, tx_ref * inside, rtol=1e-12, atol=1e-12)
    # gradient: that of clamp (1 inside, 0 where clipped)
    (g,) = torch.autograd.grad((out * tx).sum(), xg)
    xr = x.clone().requires_grad_()
    blk.clip_act = math.inf
    (g_ref,) = torch.autograd.grad((blk(xr, None, emb)[0].clamp(-clip_act, clip_act) * tx).sum(), xr)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_eval_weight_cache_follows_every_weight_change():
    conv = MPConv(6, 4, 3).eval()
    x = _randn(2, 6, 5, 5, seed=14, dtype=torch.float32)

    def fresh():  # the previous code: normalize on every call
        w = normalize(conv.weight) * (1.0 / math.sqrt(conv.weight[0].numel()))
        return F.conv2d(x.to(w.dtype), w.to(w.dtype), padding=1)

    with torch.no_grad():
        first = conv(x)[0]
        assert torch.equal(first, fresh()) and torch.equal(conv(x)[0], first)
        conv.weight.mul_(1.5).add_(0.3)  # an optimizer step / EMA lerp_ (in place, version bump)
        assert torch.equal(conv(x)[0], fresh())
        conv.load_state_dict({"weight": _randn(4, 6, 3, 3, seed=15, dtype=torch.float32)})
        assert torch.equal(conv(x)[0], fresh())
    conv.double()  # a dtype change: new storage
    with torch.no_grad():
        assert conv(x.double())[0].dtype == torch.float64 and torch.equal(conv(x.double())[0], fresh())
    # with a graph the weight is normalized afresh (the gradient flows through normalize)
    conv.weight.requires_grad_(True)
    conv(x.double())[0].sum().backward()
    assert conv.weight.grad is not None and conv._unit is None


def test_scd_teacher_output_unchanged_by_the_cache():
    cfg = resolve("shapes", "tS", "scd")
    torch.manual_seed(0)
    teacher = build_network(cfg.network, cfg.data, cfg.sigma_d).eval().requires_grad_(False)
    with torch.no_grad():
        teacher.out_gain.fill_(0.7)
    x, t = _randn(2, 3, 16, 16, seed=16, dtype=torch.float32), torch.tensor([0.4, 1.1])
    with torch.no_grad():
        a, b = teacher(x, t), teacher(x, t)  # the second call uses the cached weights
    with torch.enable_grad():
        c = teacher(x, t)  # grad mode: no cache
    assert torch.equal(a, b) and torch.equal(a, c)


# ----------------------------------------------------------------------------
# Optimizer, gradient norm, EMA.


@pytest.mark.parametrize("name", ["adam", "radam"])
def test_optimizer_matches_the_single_tensor_loop(name):
    cfg = OptimConfig(name=name, lr=1e-2, beta2=0.99, eps=1e-8)
    params = [torch.nn.Parameter(_randn(*s, seed=i, dtype=torch.float32)) for i, s in enumerate([(5, 3), (7,), ()])]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = _optimizer(cfg, params)
    kind = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[name]
    opt_ref = kind(ref, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    for step in range(6):
        for p, r in zip(params, ref):
            p.grad = _randn(*p.shape, seed=100 + step, dtype=torch.float32)
            r.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("max_norm", [math.inf, 100.0, 0.5])
def test_grad_norm_and_clip_matches_torch(max_norm):
    grads = [_randn(*s, seed=20 + i, dtype=torch.float32) for i, s in enumerate([(4, 3), (9,), (2, 2, 2)])]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, r, g in zip(params, ref, grads):
        p.grad, r.grad = g.clone(), g.clone()
    total = grad_norm_and_clip(params, max_norm)
    total_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm).item()
    assert total == pytest.approx(total_ref, rel=1e-6)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-7)
    assert (max_norm < total) == (params[0].grad.norm() < grads[0].norm())  # clipped only when above


def test_ema_update_matches_the_per_tensor_lerp():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = EMA(net, EMAConfig(kind="power", sigma_rel=0.1))
    ref = [p.detach().clone() for p in ema.model.parameters()]
    for step in range(1, 5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        beta = ema.update(net, step * 8, 8)
        ref = [r.lerp(p.detach(), 1 - beta) for r, p in zip(ref, net.parameters())]
    for p, r in zip(ema.model.parameters(), ref):
        assert torch.equal(p, r)
