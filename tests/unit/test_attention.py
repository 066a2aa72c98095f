"""Blockwise (flash-style) attention against the math reference: values, gradients, JVPs, memory."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from scm.attention import (
    _BlockwiseAttention,
    attention,
    attention_jvp,
    attention_math,
    attention_math_jvp,
)

# N = 37 is a multiple of none of the block sizes except 37 itself; 64 > N is a single short block.
N, BLOCK_SIZES = 37, [1, 8, 16, 37, 64]


def _inputs(n=N, dtype=torch.float64, seed=0, b=2, h=3, d=8, count=6):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, dtype=dtype, generator=gen) for _ in range(count)]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _blockwise(bs):
    return lambda q, k, v: attention(q, k, v, "blockwise", bs)


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_forward_matches_math(bs):
    q, k, v = _inputs(count=3)
    torch.testing.assert_close(attention(q, k, v, "blockwise", bs), attention_math(q, k, v), rtol=1e-12, atol=1e-12)


def test_forward_float32_and_large_scores():
    # Scores of order 100 would overflow exp without the running max; float32 stays float32.
    q, k, v = _inputs(dtype=torch.float32, count=3)
    out = attention(10 * q, 10 * k, v, "blockwise", 8)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, attention_math(10 * q, 10 * k, v), rtol=1e-4, atol=1e-5)


def test_cross_attention_lengths():
    (q,) = _inputs(n=23, count=1)
    k, v = _inputs(n=N, count=2, seed=1)
    torch.testing.assert_close(attention(q, k, v, "blockwise", 8), attention_math(q, k, v))


@pytest.mark.parametrize("bs", [1, 8, 64])
def test_backward_matches_math(bs):
    q, k, v, go = (x.requires_grad_(i < 3) for i, x in enumerate(_inputs(count=4)))
    grads = torch.autograd.grad(attention(q, k, v, "blockwise", bs), (q, k, v), go)
    expected = torch.autograd.grad(attention_math(q, k, v), (q, k, v), go)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_gradcheck_both_outputs():
    # The Function also returns lse; its gradient path (d_lse in the backward) is checked here too.
    q, k, v = (x.requires_grad_() for x in _inputs(n=11, b=1, h=2, d=4, count=3))
    assert torch.autograd.gradcheck(lambda q, k, v: _BlockwiseAttention.apply(q, k, v, 4, None), (q, k, v))


def _central_difference(fn, primals, tangents, eps=1e-6):
    plus = fn(*(p + eps * t for p, t in zip(primals, tangents, strict=True)))
    minus = fn(*(p - eps * t for p, t in zip(primals, tangents, strict=True)))
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("bs", [1, 8, 16, 64])
def test_jvp_matches_math_and_finite_differences(bs):
    q, k, v, tq, tk, tv = _inputs()
    fd = _central_difference(attention_math, (q, k, v), (tq, tk, tv))
    out_m, t_math = attention_math_jvp(q, k, v, tq, tk, tv)
    out_f, t_func = torch.func.jvp(_blockwise(bs), (q, k, v), (tq, tk, tv))
    out_h, t_hand = attention_jvp(q, k, v, tq, tk, tv, "blockwise", bs)
    assert _rel(t_math, fd) < 1e-6
    for out, t in ((out_f, t_func), (out_h, t_hand)):
        assert _rel(t, fd) < 1e-6
        assert _rel(t, t_math) < 1e-12
        torch.testing.assert_close(out, out_m, rtol=1e-12, atol=1e-12)


def test_math_jvp_matches_func_jvp():
    q, k, v, tq, tk, tv = _inputs()
    out, t_out = attention_math_jvp(q, k, v, tq, tk, tv)
    out_f, t_f = torch.func.jvp(attention_math, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(out, out_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t_out, t_f, rtol=1e-12, atol=1e-12)


def test_func_jvp_with_constant_inputs_and_float32():
    # Only q carries a tangent: k and v reach the JVP rule with a None tangent.
    q, k, v, tq = _inputs(dtype=torch.float32, count=4)
    _, t_block = torch.func.jvp(lambda q: attention(q, k, v, "blockwise", 8), (q,), (tq,))
    _, t_math = torch.func.jvp(lambda q: attention_math(q, k, v), (q,), (tq,))
    assert t_block.dtype == torch.float32
    torch.testing.assert_close(t_block, t_math, rtol=1e-4, atol=1e-5)


def test_jvp_primal_carries_graph_and_tangent_does_not():
    q, k, v, tq, tk, tv, go = _inputs(count=7)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    expected = torch.autograd.grad(attention_math(q, k, v), (q, k, v), go)
    out_h, t_hand = attention_jvp(q, k, v, tq, tk, tv, "blockwise", 8)
    out_f, t_func = torch.func.jvp(_blockwise(8), (q, k, v), (tq, tk, tv))
    for out, t in ((out_h, t_hand), (out_f, t_func)):
        assert not t.requires_grad  # a stop-gradient tangent, computed without a graph
        for g, e in zip(torch.autograd.grad(out, (q, k, v), go), expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_vmap():
    q, k, v = _inputs(count=3)
    torch.testing.assert_close(torch.vmap(_blockwise(8))(q, k, v), attention_math(q, k, v))


def test_bad_arguments():
    q, k, v = _inputs(count=3)
    with pytest.raises(ValueError, match="unknown implementation"):
        attention(q, k, v, "flash")
    with pytest.raises(ValueError, match="block_size"):
        attention(q, k, v, "blockwise", 0)


# ----------------------------------------------------------------------------
# Memory: no N x N tensor. RSS deltas are too noisy on the CPU (allocator caching), so this reads the
# bytes each op allocates itself, as the profiler records them: any N x N tensor must come from some op.


def largest_allocation_bytes(fn) -> int:
    """Largest CPU memory (bytes) any single op run by fn() allocates itself (children excluded).

    Self, not inclusive, memory: the autograd.Function's own event includes all its outputs (O(N D)).
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def test_blockwise_never_allocates_n_by_n():
    n, d, bs = 2048, 16, 512
    q, k, v, tq, tk, tv, go = _inputs(n=n, dtype=torch.float32, b=1, h=1, d=d, count=7)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    n_by_n = n * n * 4
    # One block of scores or one (N, D) tensor, whichever is larger, with a 2x margin: still 8x below N x N.
    bound = 2 * max(bs * bs, n * d) * 4
    assert largest_allocation_bytes(lambda: attention_jvp(q, k, v, tq, tk, tv, "math")) >= n_by_n
    runs = {
        "attention_jvp": lambda: attention_jvp(q, k, v, tq, tk, tv, "blockwise", bs),
        "func.jvp": lambda: torch.func.jvp(_blockwise(bs), (q, k, v), (tq, tk, tv)),
        "backward": lambda: torch.autograd.grad(attention(q, k, v, "blockwise", bs), (q, k, v), go),
    }
    for name, fn in runs.items():
        assert largest_allocation_bytes(fn) <= bound, name


# ----------------------------------------------------------------------------
# network.attention=auto: the fused Triton kernel on CUDA where it applies, blockwise elsewhere.


@pytest.mark.parametrize("device_type,dtype,triton_ok,expected", [
    ("cuda", torch.float32, True, "triton"), ("cuda", torch.bfloat16, True, "triton"),
    ("cuda", torch.float16, True, "triton"),
    ("cuda", torch.float64, True, "blockwise"),  # the kernel takes no float64 (finite-difference JVP)
    ("cuda", torch.bfloat16, False, "blockwise"),  # triton not installed
    ("cpu", torch.float32, True, "blockwise"), ("cpu", torch.bfloat16, False, "blockwise"),
])
def test_auto_resolution(device_type, dtype, triton_ok, expected):
    from scm.attention import resolve_attention

    assert resolve_attention("auto", device_type, dtype, triton_ok) == expected
    for impl in ("math", "blockwise", "triton"):  # explicit choices are never changed
        assert resolve_attention(impl, device_type, dtype, triton_ok) == impl


def test_auto_is_blockwise_on_cpu_and_logged_at_network_build(caplog):
    import logging

    from scm import networks
    from scm.config import resolve

    q, k, v, tq, tk, tv = _inputs()
    assert torch.equal(attention(q, k, v, "auto", 16), attention(q, k, v, "blockwise", 16))
    auto, blockwise = (attention_jvp(q, k, v, tq, tk, tv, impl, 16) for impl in ("auto", "blockwise"))
    assert all(torch.equal(a, b) for a, b in zip(auto, blockwise, strict=True))
    cfg = resolve("shapes", "tS", "teacher", {"network.attention": "auto"})
    networks._LOGGED_ATTENTION.clear()
    with caplog.at_level(logging.INFO, logger="scm.networks"):
        networks.build_network(cfg.network, cfg.data, cfg.sigma_d, device="cpu")
        networks.build_network(cfg.network, cfg.data, cfg.sigma_d, device="cpu")
    lines = [r.getMessage() for r in caplog.records if "network.attention=auto" in r.getMessage()]
    assert lines == ["network.attention=auto: blockwise attention on cpu"]  # once per process
