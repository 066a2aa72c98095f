"""scm.networks: EDM2 parameter counts, the hand-propagated JVP against finite differences, the sCM switches."""

import math

import pytest
import torch

from scm.config import CPU_SIZES, PAPER_SIZES, PRESETS, SIZES, resolve
from scm.networks import build_network, count_parameters, size_table

# EDM2's published sizes (Karras et al. 2024, Table 2), in millions: the independent reference.
EDM2_PARAMS_M = {"S": 280.2, "M": 497.8, "L": 777.6, "XL": 1119.4, "XXL": 1523.4}

# The variants of the sCM switches that a JVP must go through (c_noise and time embedding change d emb/dt).
VARIANTS = [
    {},
    {"network.c_noise": "log_sigma", "network.time_embedding": "fourier", "network.adagn": "plain"},
    {"network.guidance_input": True, "network.c_noise": "1000t", "network.time_embedding_scale": 0.02},
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets: one thread is fastest and robust to a busy machine (OpenMP waits on descheduled threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def settle(net, x, t, labels, calls=5):
    """Training mode: forced weight normalization moves the weights to its fixed point (a factor eps per call)."""
    with torch.no_grad():
        for _ in range(calls):
            net(x, t, labels)


def tiny_net(overrides=None, dtype=torch.float64, seed=0):
    """The 'shapes' tS net (16x16, attention at 16 and 8); its zero-initialized gains set to 0.7 (else F = 0)."""
    cfg = resolve("shapes", "tS", "teacher", overrides)
    torch.manual_seed(seed)
    net = build_network(cfg.network, cfg.data, cfg.sigma_d).to(dtype).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    return net


def inputs(B=2, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 16, 16, generator=g, dtype=dtype)
    t = torch.linspace(0.3, 1.2, B, dtype=dtype)
    return x, t, torch.randn(x.shape, generator=g, dtype=dtype), torch.arange(B) % 8


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def central_difference(f, x, t, tx, tt, h=1e-5, rng_state=None):
    """(f(x + h tx, t + h tt) - f(x - h tx, t - h tt)) / 2h, with torch's RNG reset before each evaluation."""
    def at(sign):
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        return f(x + sign * h * tx, t + sign * h * tt)
    with torch.no_grad():
        return (at(1) - at(-1)) / (2 * h)


# ----------------------------------------------------------------------------
# Construction and parameter counts.


@pytest.mark.parametrize("dataset", ["imagenet512", "shapes"])
def test_every_size_builds_on_meta(dataset):
    preset_size = next(s for d, s in PRESETS if d == dataset)
    counts = []
    for channels in SIZES.values():
        cfg = resolve(dataset, preset_size, "teacher", {"network.model_channels": channels})
        counts.append((channels, count_parameters(cfg.network, cfg.data, cfg.sigma_d)))
    assert all(n > 0 for _, n in counts)
    assert [n for _, n in sorted(counts)] == sorted(n for _, n in counts)  # wider nets have more parameters


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_imagenet512_counts_match_edm2(size):
    teacher, cm = resolve("imagenet512", size, "teacher"), resolve("imagenet512", size, "scd")
    assert cm.network.guidance_input and not teacher.network.guidance_input
    # EDM2's own structure (scale-only modulation) reproduces its published count.
    edm2 = count_parameters(teacher.network, teacher.data, modulation="edm2") / 1e6
    assert abs(edm2 / EDM2_PARAMS_M[size] - 1) < 0.001
    # The sCM nets (AdaGN scale and shift; the CM also has the guidance input) stay within 5 %.
    for cfg in (teacher, cm):
        n = count_parameters(cfg.network, cfg.data, cfg.sigma_d) / 1e6
        assert abs(n / EDM2_PARAMS_M[size] - 1) < 0.05, (size, n)


def test_size_table():
    rows = size_table("imagenet512")
    assert [r["size"] for r in rows] == PAPER_SIZES
    assert [r["channels"] for r in rows] == [192, 256, 320, 384, 448]
    assert all(abs(r["params_m"] / EDM2_PARAMS_M[r["size"]] - 1) < 0.05 for r in rows)
    assert [r["size"] for r in size_table("shapes")] == CPU_SIZES


# ----------------------------------------------------------------------------
# JVP: torch.func.jvp and the hand-propagated forward_with_tangent against central differences (float64).


@pytest.mark.parametrize("overrides", VARIANTS, ids=["sCM", "edm-time+plain", "guidance+1000t"])
@pytest.mark.parametrize("direction", ["x", "t"])
def test_jvp_matches_finite_differences(overrides, direction):
    net = tiny_net(overrides)
    x, t, tx, labels = inputs()
    tt = torch.tensor([0.7, -1.3], dtype=x.dtype)
    tx, tt = (tx, torch.zeros_like(tt)) if direction == "x" else (torch.zeros_like(tx), tt)
    guidance = torch.tensor([1.3, 1.8], dtype=x.dtype) if net.cfg.guidance_input else None
    f = lambda x, t: net(x, t, labels, guidance)
    fd = central_difference(f, x, t, tx, tt)
    _, jvp_func = torch.func.jvp(f, (x, t), (tx, tt))
    F, jvp_hand = net.forward_with_tangent(x, t, tx, tt, labels, guidance)
    assert rel(jvp_func, fd) < 1e-5
    assert rel(jvp_hand, fd) < 1e-5
    assert rel(jvp_hand, jvp_func) < 1e-12
    assert torch.allclose(F, f(x, t), rtol=0, atol=1e-14)


def test_forward_with_tangent_gradient_equals_forward():
    net = tiny_net()
    x, t, tx, labels = inputs()
    R = torch.randn_like(x)  # a random linear functional <R, F>

    def grads(F):
        net.zero_grad(set_to_none=True)
        (R * F).sum().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    g_forward = grads(net(x, t, labels))
    F, tF = net.forward_with_tangent(x, t, tx, torch.ones_like(t), labels)
    assert not tF.requires_grad and F.requires_grad  # the tangent is a stop-gradient constant
    g_hand = grads(F)
    assert g_forward.keys() == g_hand.keys()
    assert set(g_forward) == {n for n, _ in net.named_parameters()} - {"logvar_linear.weight"}  # w_phi's head
    for name in g_forward:
        assert torch.allclose(g_hand[name], g_forward[name], rtol=1e-10, atol=1e-14), name


def test_dropout_masks_are_shared_by_value_and_tangent():
    net = tiny_net({"network.dropout": 0.3, "network.label_dropout": 0.5}).train()
    x, t, tx, labels = inputs(B=4)
    tt = torch.tensor([0.7, -1.3, 0.2, 1.0], dtype=x.dtype)
    settle(net, x, t, labels)  # finite differences need the same weights in every evaluation
    state = torch.get_rng_state()
    f = lambda x, t: net(x, t, labels)
    fd = central_difference(f, x, t, tx, tt, rng_state=state)
    torch.set_rng_state(state)
    F, tF = net.forward_with_tangent(x, t, tx, tt, labels)
    assert rel(tF, fd) < 1e-5
    torch.set_rng_state(state)
    assert torch.allclose(F, f(x, t), rtol=0, atol=1e-12)
    assert rel(net(x, t, labels), F) > 1e-3  # another RNG state: other masks (dropout is active)
    torch.set_rng_state(state)
    _, jvp_func = torch.func.jvp(f, (x, t), (tx, tt))  # train mode under torch.func works too
    assert rel(jvp_func, tF) < 1e-10


def test_forced_weight_normalization():
    net = tiny_net().train()
    x, t, tx, labels = inputs()
    conv = net.out_conv
    with torch.no_grad():
        conv.weight.mul_(3.0)  # like an optimizer step: the stored weight leaves the unit sphere
    F = net(x, t, labels)
    norms = conv.weight.flatten(1).norm(dim=1) / math.sqrt(conv.weight[0].numel())
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3)  # EDM2: renormalized in training mode
    # Several training-mode calls before one backward (sCD/sCT call the net twice) keep the graph valid.
    _, tF = net.forward_with_tangent(x, t, tx, torch.ones_like(t), labels)
    (F.square().sum() + (F * tF).sum()).backward()
    assert all(p.grad is not None for p in conv.parameters())
    assert torch.allclose(net(x, t, labels), F, rtol=0, atol=1e-6)  # the effective weight is scale-invariant


def test_forward_with_tangent_under_no_grad():
    net = tiny_net()
    x, t, tx, labels = inputs()
    F, tF = net.forward_with_tangent(x, t, tx, torch.ones_like(t), labels)
    with torch.no_grad():
        F0, tF0 = net.forward_with_tangent(x, t, tx, torch.ones_like(t), labels)
    assert tF0 is not None and not F0.requires_grad
    assert torch.allclose(tF0, tF, rtol=0, atol=1e-14) and torch.allclose(F0, F, rtol=0, atol=1e-14)


def test_float32_paths_agree():
    net = tiny_net(dtype=torch.float32)
    x, t, tx, labels = inputs(dtype=torch.float32)
    tt = torch.ones_like(t)
    F, jvp_func = torch.func.jvp(lambda x, t: net(x, t, labels), (x, t), (tx, tt))
    F_hand, jvp_hand = net.forward_with_tangent(x, t, tx, tt, labels)
    assert F_hand.dtype == torch.float32 and rel(F_hand, F) < 1e-5 and rel(jvp_hand, jvp_func) < 1e-4


# ----------------------------------------------------------------------------
# The switches change what they should.


def test_guidance_input_only_when_enabled():
    x, t, _, labels = inputs()
    ones, twos = torch.ones_like(t), 2 * torch.ones_like(t)
    with torch.no_grad():
        net = tiny_net({"network.guidance_input": True})
        assert rel(net(x, t, labels, twos), net(x, t, labels, ones)) > 1e-3
        assert torch.equal(net(x, t, labels, None), net(x, t, labels, ones))  # None means s = 1
        net.guidance_gain.zero_()  # zero-initialized: at init the CM computes its teacher's function
        assert torch.equal(net(x, t, labels, twos), net(x, t, labels, ones))
        net = tiny_net()
        assert torch.equal(net(x, t, labels, twos), net(x, t, labels, None))


def test_label_dropout_one_makes_labels_irrelevant():
    x, t, _, labels = inputs()
    with torch.no_grad():
        net = tiny_net({"network.label_dropout": 1.0})
        assert rel(net(x, t, labels), net(x, t, (labels + 3) % 8)) > 1e-3  # eval mode: labels matter
        net.train()
        settle(net, x, t, labels)
        F = net(x, t, labels)
        for other in ((labels + 3) % 8, None):
            assert torch.allclose(net(x, t, other), F, rtol=0, atol=1e-12)


def test_c_noise_variants():
    t = torch.tensor([0.0, 0.4, 1.1, math.pi / 2], dtype=torch.float64)
    x, _, _, labels = inputs(B=4)
    nets = {kind: tiny_net({"network.c_noise": kind}) for kind in ("t", "log_sigma", "1000t")}
    assert torch.equal(nets["t"].c_noise(t)[0], t)
    assert torch.allclose(nets["1000t"].c_noise(t)[0], 1000 * t)
    c = nets["log_sigma"].c_noise(t)[0]
    assert torch.isfinite(c).all() and torch.allclose(c[1:3], torch.log(0.5 * torch.tan(t[1:3])))
    with torch.no_grad():  # same weights, different time conditioning: different embeddings and outputs
        embs = [net._embedding(t, None, labels, None)[0] for net in nets.values()]
        outs = [net(x, t, labels) for net in nets.values()]
    assert all(torch.isfinite(o).all() for o in outs)
    for i in range(3):
        assert rel(embs[i], embs[i - 1]) > 1e-3 and rel(outs[i], outs[i - 1]) > 1e-3


def test_w_phi_shape():
    for kind in ("t", "log_sigma"):
        net = tiny_net({"network.c_noise": kind})
        w = net.w_phi(torch.tensor([0.0, 0.3, 1.0, math.pi / 2], dtype=torch.float64))
        assert w.shape == (4,) and torch.isfinite(w).all() and w.requires_grad


@pytest.mark.parametrize("impl", ["math", "blockwise"])
def test_attention_implementations(impl):
    net = tiny_net({"network.attention": impl, "network.attn_block_size": 64})
    reference = tiny_net()
    x, t, tx, labels = inputs()
    F, tF = net.forward_with_tangent(x, t, tx, torch.ones_like(t), labels)
    F0, tF0 = reference.forward_with_tangent(x, t, tx, torch.ones_like(t), labels)
    assert rel(F, F0) < 1e-10 and rel(tF, tF0) < 1e-10
