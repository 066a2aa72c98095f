"""Attention that supports forward-mode AD on the CPU (PyTorch's SDPA has no CPU forward-mode AD).

Shapes: q, k, v are (B, H, N, D). Two entry points:
- attention(q, k, v): the output; differentiable by reverse mode and usable under torch.func.jvp.
- attention_jvp(q, k, v, tq, tk, tv): (out, t_out) for hand-propagated tangents; `out` keeps the
  autograd graph through q, k, v, `t_out` is computed without one (sCM Sec. 5.1, App. F: the JVP of attention).

impl="math" materializes the N x N attention matrix; impl="blockwise" is a pure-PyTorch flash-style
version (online softmax over key blocks) that holds at most block_size x block_size scores per
(batch, head) at a time, in the forward, the backward and the JVP.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch

# ----------------------------------------------------------------------------
# Math reference: materializes the N x N attention matrix.


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


def attention_math_jvp(q, k, v, tq, tk, tv):
    """t_out = (p * t_s) v - rowsum(p * t_s) (p v) + p t_v, t_s = (t_q k^T + q t_k^T) / sqrt(d)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    out = p @ v
    with torch.no_grad():
        p_ = p.detach()
        t_s = (tq @ k.detach().transpose(-1, -2) + q.detach() @ tk.transpose(-1, -2)) * scale
        pt = p_ * t_s
        t_out = pt @ v.detach() - pt.sum(-1, keepdim=True) * out.detach() + p_ @ tv
    return out, t_out


# ----------------------------------------------------------------------------
# Blockwise (flash-style) attention: online softmax, never more than block x block scores at a time.


def _blocks(n: int, size: int) -> list[slice]:
    # Contiguous blocks of range(n); the last one is shorter when size does not divide n.
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _online_pass(q, k, v, block_size, tangents=None):
    """Forward sweep: (out, lse) and, given tangents (tq, tk, tv), also (t_out, t_lse) (sCM App. F).

    Per query block it keeps the running max m, normalizer l = sum_j e^{s_j - m} and numerator
    sum_j e^{s_j - m} v_j; with tangents also mu = sum_j e^{s_j - m} t_s_j and
    g = sum_j e^{s_j - m} (t_s_j v_j + t_v_j) (the §3 g plus the p t_v numerator, which rescale alike).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs, lses, t_outs, t_lses = [], [], [], []
    for qb in _blocks(q.shape[-2], block_size):
        qi = q[..., qb, :]
        m = qi.new_full((*qi.shape[:-1], 1), -math.inf)
        l = qi.new_zeros((*qi.shape[:-1], 1))
        acc = qi.new_zeros((*qi.shape[:-1], v.shape[-1]))
        if tangents is not None:
            tqi = tangents[0][..., qb, :]
            mu, g = torch.zeros_like(l), torch.zeros_like(acc)
        for kb in _blocks(k.shape[-2], block_size):
            kj, vj = k[..., kb, :], v[..., kb, :]
            s = (qi @ _t(kj)) * scale
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            # Everything accumulated against the old max is rescaled by e^{m_old - m_new}.
            alpha = torch.exp(m - m_new)
            e = torch.exp(s - m_new)
            l = alpha * l + e.sum(-1, keepdim=True)
            acc = alpha * acc + e @ vj
            if tangents is not None:
                # t_s = (t_q k^T + q t_k^T) / sqrt(d), only for this block.
                t_s = (tqi @ _t(kj) + qi @ _t(tangents[1][..., kb, :])) * scale
                et = e * t_s
                mu = alpha * mu + et.sum(-1, keepdim=True)
                g = alpha * g + et @ vj + e @ tangents[2][..., kb, :]
            m = m_new
        out = acc / l
        outs.append(out)
        lses.append((m + torch.log(l)).squeeze(-1))
        if tangents is not None:
            # t_out = g / l - (mu / l) out + (p t_v); d lse = sum_j p_j t_s_j = mu / l.
            t_outs.append((g - mu * out) / l)
            t_lses.append((mu / l).squeeze(-1))
    out, lse = torch.cat(outs, -2), torch.cat(lses, -1)
    if tangents is None:
        return out, lse
    return out, lse, torch.cat(t_outs, -2), torch.cat(t_lses, -1)


def _tangent_pass(q, k, v, out, lse, tq, tk, tv, block_size):
    """(t_out, t_lse) when the forward's out and lse are known: §3 with m = lse, so l = 1, no rescaling."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    t_outs, t_lses = [], []
    for qb in _blocks(q.shape[-2], block_size):
        qi, tqi, lse_i = q[..., qb, :], tq[..., qb, :], lse[..., qb, None]
        mu = qi.new_zeros((*qi.shape[:-1], 1))
        g = qi.new_zeros((*qi.shape[:-1], v.shape[-1]))
        for kb in _blocks(k.shape[-2], block_size):
            kj = k[..., kb, :]
            # p = e^{s - lse} is already normalized by the final softmax denominator.
            p = torch.exp((qi @ _t(kj)) * scale - lse_i)
            pt = p * ((tqi @ _t(kj) + qi @ _t(tk[..., kb, :])) * scale)
            mu = mu + pt.sum(-1, keepdim=True)
            g = g + pt @ v[..., kb, :] + p @ tv[..., kb, :]
        t_outs.append(g - mu * out[..., qb, :])
        t_lses.append(mu.squeeze(-1))
    return torch.cat(t_outs, -2), torch.cat(t_lses, -1)


def _backward_pass(q, k, v, out, lse, d_out, d_lse, block_size):
    """Flash-attention-2 backward: scores recomputed per block from q, k and lse; never N x N."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    q_blocks, k_blocks = _blocks(q.shape[-2], block_size), _blocks(k.shape[-2], block_size)
    # ds_ij = p_ij (dP_ij - D_i + g_lse_i) with D_i = rowsum(dO * O), since d lse_i / d s_ij = p_ij.
    delta = (d_out * out).sum(-1, keepdim=True) - d_lse.unsqueeze(-1)
    dq = [torch.zeros_like(q[..., qb, :]) for qb in q_blocks]
    dk, dv = [], []
    for kb in k_blocks:
        kj, vj = k[..., kb, :], v[..., kb, :]
        dk_j, dv_j = torch.zeros_like(kj), torch.zeros_like(vj)
        for i, qb in enumerate(q_blocks):
            qi, d_out_i = q[..., qb, :], d_out[..., qb, :]
            p = torch.exp((qi @ _t(kj)) * scale - lse[..., qb, None])
            dv_j = dv_j + _t(p) @ d_out_i
            ds = p * (d_out_i @ _t(vj) - delta[..., qb, :]) * scale
            dq[i] = dq[i] + ds @ kj
            dk_j = dk_j + _t(ds) @ qi
        dk.append(dk_j)
        dv.append(dv_j)
    return torch.cat(dq, -2), torch.cat(dk, -2), torch.cat(dv, -2)


class _BlockwiseAttention(torch.autograd.Function):
    """(out, lse) of softmax(q k^T / sqrt(d)) v, blockwise in forward, backward and forward-mode AD.

    `precomputed` is an optional (out, lse) from a fused pass (attention_blockwise_jvp): it is returned
    as is, so the graph to q, k, v is attached without recomputing the forward.
    The JVP rule runs under no_grad: the tangent is a constant w.r.t. q, k, v (sCM only uses it under a
    stop-gradient), because a differentiable tangent would keep every block's intermediates, O(N^2).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, block_size, precomputed=None):
        if precomputed is not None:
            return precomputed
        return _online_pass(q, k, v, block_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, block_size, _ = inputs
        out, lse = output
        ctx.block_size = block_size
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.save_for_forward(q, k, v, out, lse)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        return (*_backward_pass(q, k, v, out, lse, d_out, d_lse, ctx.block_size), None, None)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _block_size, _precomputed):
        q, k, v, out, lse = ctx.saved_tensors
        # An input without a tangent (a constant under torch.func.jvp) arrives as None.
        tq, tk, tv = (torch.zeros_like(x) if t is None else t for x, t in ((q, tq), (k, tk), (v, tv)))
        with torch.no_grad():
            return _tangent_pass(q, k, v, out, lse, tq, tk, tv, ctx.block_size)


def attention_blockwise(q, k, v, block_size: int = 64) -> torch.Tensor:
    """Same value as attention_math; reverse mode and torch.func.jvp both go blockwise."""
    _check_block_size(block_size)
    return _BlockwiseAttention.apply(q, k, v, block_size, None)[0]


def attention_blockwise_jvp(q, k, v, tq, tk, tv, block_size: int = 64):
    """(out, t_out) from one fused online-softmax pass; `out` carries the graph to q, k, v, `t_out` none."""
    _check_block_size(block_size)
    with torch.no_grad():
        out, lse, t_out, _ = _online_pass(
            q.detach(), k.detach(), v.detach(), block_size, (tq.detach(), tk.detach(), tv.detach())
        )
    # Reuse the fused pass's (out, lse) as the Function's output: the graph is attached, nothing recomputed.
    out, _ = _BlockwiseAttention.apply(q, k, v, block_size, (out, lse))
    return out, t_out


def _check_block_size(block_size: int) -> None:
    if block_size < 1:
        raise ValueError(f"network.attn_block_size must be >= 1, got {block_size}")


# ----------------------------------------------------------------------------
# Dispatch by implementation name (network.attention in the config).


# impl="triton" is the fused Triton kernel (scm/triton_attention.py; CUDA only, block sizes its own):
# imported only in its branch, so the CPU paths never import triton. impl="auto" picks it where it applies.

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the fused kernel accepts


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_attention(impl: str, device_type: str, dtype: torch.dtype, triton_ok: bool) -> str:
    """network.attention=auto: the fused Triton kernel (Sec. 5.1, App. F) on CUDA when triton is installed
    and the dtype is one it takes (float64, e.g. the finite-difference JVP, is not), blockwise elsewhere;
    any other choice is returned as is."""
    if impl != "auto":
        return impl
    return "triton" if device_type == "cuda" and triton_ok and dtype in TRITON_DTYPES else "blockwise"


def _resolve(impl: str, q: torch.Tensor) -> str:
    return resolve_attention(impl, q.device.type, q.dtype, impl == "auto" and triton_installed())


def attention(q, k, v, impl: str = "math", block_size: int = 64) -> torch.Tensor:
    impl = _resolve(impl, q)
    if impl == "math":
        return attention_math(q, k, v)
    if impl == "blockwise":
        return attention_blockwise(q, k, v, block_size)
    if impl == "triton":
        from scm.triton_attention import flash_attention

        return flash_attention(q, k, v)
    raise ValueError(f"network.attention: unknown implementation {impl!r}; choose math, blockwise, triton or auto")


def attention_jvp(q, k, v, tq, tk, tv, impl: str = "math", block_size: int = 64):
    impl = _resolve(impl, q)
    if impl == "math":
        return attention_math_jvp(q, k, v, tq, tk, tv)
    if impl == "blockwise":
        return attention_blockwise_jvp(q, k, v, tq, tk, tv, block_size)
    if impl == "triton":
        from scm.triton_attention import flash_attention_jvp

        return flash_attention_jvp(q, k, v, tq, tk, tv)
    raise ValueError(f"network.attention: unknown implementation {impl!r}; choose math, blockwise, triton or auto")
