"""Fused flash attention with its JVP in one Triton kernel (sCM Sec. 5.1, App. F).

Shapes: q (B, H, M, D), k and v (B, H, N, D), and tangents tq, tk, tv of the same shapes; any strides.
dtypes float32, bfloat16 or float16 (all six alike); any head dim D <= 256 (the kernel pads D to a power
of two >= 16 with masked loads: 32, 64 and 128 need no padding); M and N need not be multiples of the
block sizes (masked loads, -inf scores for missing keys). No causal mask.

One program owns BLOCK_M query rows of one (batch, head) and streams over the keys in blocks of BLOCK_N.
It keeps in fp32 (online softmax, scores in log2 units so that exp is exp2):

    m   running row max of s = q k^T / sqrt(d)
    l   sum_j e^{s_j - m}
    acc sum_j e^{s_j - m} v_j
    mu  sum_j e^{s_j - m} t_s_j                     with t_s = (t_q k^T + q t_k^T) / sqrt(d)
    g   sum_j e^{s_j - m} (t_s_j v_j + t_v_j)       (the §3 g plus the p t_v numerator: both rescale alike)

each rescaled by e^{m_old - m_new} when the max moves, and finally writes

    out   = acc / l
    t_out = g / l - (mu / l) out  =  (g - mu out) / l

So memory is O(N): no N x N matrix exists, only BLOCK_M x BLOCK_N tiles in registers. Per key block the
program does six tile products (q k^T, t_q k^T, q t_k^T; e v, (e t_s) v, e t_v), against two for a plain
flash forward: a fused JVP costs about 3x a forward in matrix work and reads q, k, v only once.
In bf16/fp16 the probabilities e and e t_s are rounded to the input dtype before their products with
v and t_v (as in every flash kernel); all sums are fp32. For fp32 inputs the products use
input_precision="tf32x3" (about fp32 accuracy on the tensor cores; "ieee" is plain fp32 FMA, exact but
it spills heavily on sm_90; "tf32" is ~3e-4 relative); `precision=` picks another.

Autograd: flash_attention and flash_attention_jvp return `out` with a graph to q, k, v when those require
grad (t_out never has one: sCM uses the tangent under a stop-gradient). The backward does NOT use a
Triton kernel: it recomputes the attention with torch's scaled_dot_product_attention under autograd and
differentiates that (activation-checkpointing style). On CUDA SDPA dispatches to its flash / memory-
efficient kernels, so the backward is O(N) in memory too, at the cost of one extra forward. This keeps
the hand-written kernel forward-only and makes the gradient exactly torch's. torch.func.jvp through
flash_attention uses the fused kernel as the Function's jvp rule.

Autocast: under torch.autocast on the inputs' device the six inputs are cast to the autocast dtype
first (as a matmul would be), so attention runs in bf16/fp16 like the math implementation does.

Triton is imported on first use, not at module import, and kernels need a CUDA device, except under
TRITON_INTERPRET=1 (Triton's CPU interpreter; set it before the first call in the process), where CPU
tensors are accepted: that is how tests/gpu/test_triton_attention.py checks the kernel's math on a
machine without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


def interpreter_mode() -> bool:
    """True when Triton's CPU interpreter is requested (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    try:
        _kernel()
    except Exception:  # noqa: BLE001 - any failure to import/define means "not available"
        return False
    return True


# ----------------------------------------------------------------------------
# The kernel, defined on first use (importing this module never imports triton).


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _attn_fwd_jvp_kernel(
        Q, K, V, TQ, TK, TV, O, TO,
        s_qb, s_qh, s_qn, s_qd,
        s_kb, s_kh, s_kn, s_kd,
        s_vb, s_vh, s_vn, s_vd,
        s_tqb, s_tqh, s_tqn, s_tqd,
        s_tkb, s_tkh, s_tkn, s_tkd,
        s_tvb, s_tvh, s_tvn, s_tvd,
        s_ob, s_oh, s_on, s_od,  # O and TO: same shape, same (contiguous) strides
        H, M, N, D, num_m_blocks,
        qk_scale,  # log2(e) / sqrt(D): scores in log2 units
        t_scale,  # 1 / sqrt(D): the tangent of the (natural-unit) scores
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_TANGENT: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # A 1D grid (no 65535 limit on the batch x heads axis); consecutive programs share one (b, h),
        # so its keys and values stay in L2 while its query blocks run.
        pid = tl.program_id(0)
        pid_m = pid % num_m_blocks
        pid_bh = pid // num_m_blocks
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_j = tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_d = offs_d < D
        mask_md = mask_m[:, None] & mask_d[None, :]

        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                    mask=mask_md, other=0.0)
        k_base = K + b * s_kb + h * s_kh
        v_base = V + b * s_vb + h * s_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        mu = tl.zeros([BLOCK_M], dtype=tl.float32)
        g = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if HAS_TANGENT:
            tq = tl.load(TQ + b * s_tqb + h * s_tqh + offs_m[:, None] * s_tqn + offs_d[None, :] * s_tqd,
                         mask=mask_md, other=0.0)
            tk_base = TK + b * s_tkb + h * s_tkh
            tv_base = TV + b * s_tvb + h * s_tvh

        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + offs_j
            mask_n = offs_n < N
            mask_nd = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=mask_nd, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=mask_nd, other=0.0)

            # Scores (log2 units); keys past N get -inf, i.e. weight exactly 0.
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block holds >= 1 valid key
            alpha = tl.exp2(m_i - m_new)  # e^{m_old - m_new}; 0 on the first block (m_old = -inf)
            e = tl.exp2(s - m_new[:, None])  # e^{s_j - m}
            l_i = l_i * alpha + tl.sum(e, 1)
            acc = tl.dot(e.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)

            if HAS_TANGENT:
                tk = tl.load(tk_base + offs_n[:, None] * s_tkn + offs_d[None, :] * s_tkd, mask=mask_nd, other=0.0)
                tv = tl.load(tv_base + offs_n[:, None] * s_tvn + offs_d[None, :] * s_tvd, mask=mask_nd, other=0.0)
                # t_s = (t_q k^T + q t_k^T) / sqrt(d); finite on masked keys (zeros loaded), where e = 0.
                t_s = tl.dot(tq, tl.trans(k), input_precision=PRECISION)
                t_s = tl.dot(q, tl.trans(tk), t_s, input_precision=PRECISION) * t_scale
                et = e * t_s
                mu = mu * alpha + tl.sum(et, 1)
                g = tl.dot(et.to(v.dtype), v, g * alpha[:, None], input_precision=PRECISION)
                g = tl.dot(e.to(tv.dtype), tv, g, input_precision=PRECISION)
            m_i = m_new

        inv_l = 1.0 / l_i
        out = acc * inv_l[:, None]
        o_offs = b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od
        tl.store(O + o_offs, out.to(O.dtype.element_ty), mask=mask_md)
        if HAS_TANGENT:
            # t_out = g / l - (mu / l) out, with the fp32 out (not the rounded stored one).
            t_out = (g - mu[:, None] * out) * inv_l[:, None]
            tl.store(TO + o_offs, t_out.to(TO.dtype.element_ty), mask=mask_md)

    return _attn_fwd_jvp_kernel


# ----------------------------------------------------------------------------
# Launch configuration.


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def candidate_configs(head_dim: int, dtype: torch.dtype, has_tangent: bool) -> list[KernelConfig]:
    """Launch configurations to try, most preferred first (smaller ones as fallbacks on OutOfResources).

    Register budget per program: acc and g are BLOCK_M x BLOCK_D fp32 each, s, t_s, e t_s are
    BLOCK_M x BLOCK_N fp32; the key tiles (k, v, t_k, t_v) come through shared memory num_stages deep.
    The first choices were checked offline for sm_90 with Triton 3.8 (compile_offline + cuobjdump
    -res-usage): bf16 D=64 JVP at (128, 64, 8 warps, 2 stages) uses 255 registers, no spills, wgmma;
    D=128 JVP at (64, 32, 8, 2) spills a little (136 B stack); fp32 (tf32x3) D=64 at (128, 32, 8, 2)
    spills a little (304 B).
    """
    bd = _pow2_at_least(head_dim)
    C = KernelConfig
    if dtype != torch.float32:
        if bd <= 64:
            first = [C(128, 64, 8, 2), C(64, 32, 4, 1)] if has_tangent else [C(128, 64, 8, 2), C(128, 64, 4, 3)]
        elif bd <= 128:
            first = [C(64, 32, 8, 2), C(64, 64, 8, 2)] if has_tangent else [C(128, 64, 8, 2), C(64, 64, 4, 2)]
        else:
            first = [C(32, 32, 8, 1)] if has_tangent else [C(64, 32, 8, 1)]
    else:
        if bd <= 64:
            first = [C(128, 32, 8, 2), C(64, 32, 4, 2)]
        else:
            first = [C(64, 32, 8, 1), C(32, 32, 4, 1)]
    fallbacks = [C(64, 32, 4, 1), C(32, 32, 4, 1), C(16, 16, 4, 1)]
    out: list[KernelConfig] = []
    for c in first + fallbacks:
        if c not in out:
            out.append(c)
    return out


def default_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs use tf32x3 (three tf32 products, ~fp32 accuracy, tensor cores);
    'ieee' (plain fp32 FMA) is exact but spills heavily on sm_90; ignored for 16-bit inputs."""
    if dtype in _DEFAULT_PRECISION_OVERRIDE:
        return _DEFAULT_PRECISION_OVERRIDE[dtype]
    return "tf32x3" if dtype == torch.float32 else "tf32"


_DEFAULT_PRECISION_OVERRIDE: dict[torch.dtype, str] = {}


_chosen: dict[tuple, KernelConfig] = {}  # (D, dtype, has_tangent) -> the config that compiled and ran


# ----------------------------------------------------------------------------
# Validation and launch (no autograd here).


def _check(tensors: list[torch.Tensor], names: list[str]) -> None:
    for name, x in zip(names, tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"triton attention: {name} must be a tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"triton attention: {name} must be (B, H, N, D), got shape {tuple(x.shape)}")
    q, k, v = tensors[:3]
    if k.shape != v.shape:
        raise ValueError(f"triton attention: k and v must have the same shape, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"triton attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and D")
    for name, x, ref in zip(names[3:], tensors[3:], (q, k, v)):
        if x.shape != ref.shape:
            raise ValueError(f"triton attention: tangent {name} must have the shape of its primal "
                             f"{tuple(ref.shape)}, got {tuple(x.shape)}")
    dtypes = {x.dtype for x in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"triton attention: all inputs need one dtype, got {sorted(map(str, dtypes))}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"triton attention: dtype {q.dtype} not supported; use float32, bfloat16 or float16")
    D = q.shape[-1]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"triton attention: head dim {D} not supported (1..{MAX_HEAD_DIM})")
    if k.shape[2] == 0:
        raise ValueError("triton attention: no keys (N = 0)")
    devices = {x.device for x in tensors}
    if len(devices) != 1:
        raise ValueError(f"triton attention: all inputs must be on one device, got {sorted(map(str, devices))}")
    dev = q.device
    if dev.type == "cuda":
        return
    if dev.type == "cpu" and interpreter_mode():
        return
    raise RuntimeError(f"triton attention needs CUDA tensors (got {dev}); on the CPU use network.attention=math "
                       f"or blockwise, or set TRITON_INTERPRET=1 (Triton's slow interpreter, for tests)")


def _is_out_of_resources(exc: BaseException) -> bool:
    return "OutOfResources" in type(exc).__name__ or "out of resource" in str(exc).lower()


def _run(kernel, grid, cfg, bd, precision, has_t, q, k, v, tq, tk, tv, out, t_out, H, M, N, D, num_m_blocks):
    kernel[grid](
        q, k, v, tq, tk, tv, out, t_out,
        *q.stride(), *k.stride(), *v.stride(), *tq.stride(), *tk.stride(), *tv.stride(),
        *out.stride(),
        H, M, N, D, num_m_blocks,
        LOG2E / math.sqrt(D), 1.0 / math.sqrt(D),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd,
        HAS_TANGENT=has_t, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _launch(q, k, v, tq=None, tk=None, tv=None, config: KernelConfig | None = None,
            precision: str | None = None):
    """(out, t_out or None); out and t_out are new contiguous (B, H, M, D) tensors in q's dtype."""
    has_t = tq is not None
    kernel = _kernel()
    B, H, M, D = q.shape
    N = k.shape[2]
    out = torch.empty((B, H, M, D), dtype=q.dtype, device=q.device)
    t_out = torch.empty_like(out) if has_t else None
    if B * H * M == 0:
        return out, t_out
    explicit_precision = precision is not None
    if precision is None:
        precision = default_precision(q.dtype)
    tq_, tk_, tv_ = (tq, tk, tv) if has_t else (q, k, v)  # dummies, never read without tangents
    to_ = t_out if has_t else out
    bd = _pow2_at_least(D)
    key = (D, q.dtype, has_t, precision)
    if config is not None:
        configs = [config]
    else:  # the config that worked last for this key first (new strides can mean a new compilation)
        configs = candidate_configs(D, q.dtype, has_t)
        if key in _chosen:
            configs = [_chosen[key]] + [c for c in configs if c != _chosen[key]]
    last_exc: BaseException | None = None
    for cfg in configs:
        num_m_blocks = -(-M // cfg.block_m)
        grid = (num_m_blocks * B * H,)
        try:
            with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
                _run(kernel, grid, cfg, bd, precision, has_t, q, k, v, tq_, tk_, tv_, out, to_, H, M, N, D,
                     num_m_blocks)
        except Exception as exc:  # noqa: BLE001
            if config is None and _is_out_of_resources(exc):
                last_exc = exc
                continue
            if precision == "tf32x3" and not explicit_precision:
                # A Triton without tf32x3 for this target: fall back to plain fp32 once, and remember.
                _DEFAULT_PRECISION_OVERRIDE[q.dtype] = "ieee"
                return _launch(q, k, v, tq, tk, tv, config=config, precision="ieee")
            raise
        _chosen[key] = cfg
        return out, t_out
    raise RuntimeError(f"triton attention: no launch configuration fits (D={D}, {q.dtype}): {last_exc}")


def _autocast(tensors):
    """Cast to the autocast dtype when autocast is on for the tensors' device (as a matmul would be)."""
    dev = tensors[0].device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except TypeError:  # older torch: no device argument
        enabled = torch.is_autocast_enabled() if dev == "cuda" else torch.is_autocast_cpu_enabled()
    if not enabled:
        return tensors
    try:
        dtype = torch.get_autocast_dtype(dev)
    except AttributeError:
        dtype = torch.get_autocast_gpu_dtype() if dev == "cuda" else torch.get_autocast_cpu_dtype()
    return [x.to(dtype) for x in tensors]


# ----------------------------------------------------------------------------
# Autograd: forward by the kernel, backward by recomputing with SDPA, forward-mode by the fused kernel.


def _sdpa(q, k, v):
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v)


def _is_wrapped(x: torch.Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except AttributeError:  # pragma: no cover - older torch
        return False


def _tangent_torch(q, k, v, tq, tk, tv, chunk: int = 1024):
    """t_out = (p * t_s) v - rowsum(p * t_s) (p v) + p t_v in PyTorch, chunk query rows at a time, fp32 math."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    k32, v32, tk32, tv32 = (x.float() for x in (k, v, tk, tv))
    parts = []
    for i in range(0, q.shape[-2], chunk):
        qi, tqi = q[..., i:i + chunk, :].float(), tq[..., i:i + chunk, :].float()
        p = torch.softmax((qi @ k32.transpose(-1, -2)) * scale, dim=-1)
        pt = p * ((tqi @ k32.transpose(-1, -2) + qi @ tk32.transpose(-1, -2)) * scale)
        parts.append(pt @ v32 - pt.sum(-1, keepdim=True) * (p @ v32) + p @ tv32)
    return torch.cat(parts, -2).to(q.dtype)


class _FlashAttention(torch.autograd.Function):
    """out = softmax(q k^T / sqrt(d)) v by the Triton kernel; `precomputed` (from a fused JVP launch) is
    returned as is so the graph to q, k, v is attached without running the forward again."""

    @staticmethod
    def forward(q, k, v, precomputed=None, config=None, precision=None):
        if precomputed is not None:
            return precomputed
        return _launch(q, k, v, config=config, precision=precision)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs[:3]
        ctx.config, ctx.precision = inputs[4], inputs[5]
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v = ctx.saved_tensors
        # Recompute with torch's SDPA under autograd (flash / memory-efficient kernels on CUDA: O(N) memory).
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            out = _sdpa(*leaves)
            grads = torch.autograd.grad(out, leaves, d_out.to(out.dtype))
        needs = ctx.needs_input_grad
        return (*(gr if needs[i] else None for i, gr in enumerate(grads)), None, None, None)

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        q, k, v = ctx.saved_tensors
        tq, tk, tv = (torch.zeros_like(x) if t is None else t.to(x.dtype) for x, t in ((q, tq), (k, tk), (v, tv)))
        with torch.no_grad():
            if any(_is_wrapped(x) for x in (q, k, v, tq, tk, tv)):
                # Under torch.func transforms the tensors are functorch wrappers, which a Triton launch cannot
                # take: use the same formula in PyTorch, in query chunks (O(chunk x N) memory).
                return _tangent_torch(q, k, v, tq, tk, tv)
            return _launch(q, k, v, tq, tk, tv, config=ctx.config, precision=ctx.precision)[1]


def flash_attention(q, k, v, *, config: KernelConfig | None = None, precision: str | None = None):
    """softmax(q k^T / sqrt(d)) v by the Triton kernel; differentiable (backward via SDPA recompute),
    and usable under torch.func.jvp (the fused kernel is the jvp rule)."""
    _check([q, k, v], ["q", "k", "v"])
    q, k, v = _autocast([q, k, v])
    return _FlashAttention.apply(q, k, v, None, config, precision)


def flash_attention_jvp(q, k, v, tq, tk, tv, *, config: KernelConfig | None = None,
                        precision: str | None = None):
    """(out, t_out) from one fused launch; out keeps the graph to q, k, v (when they need one), t_out none."""
    _check([q, k, v, tq, tk, tv], ["q", "k", "v", "tq", "tk", "tv"])
    q, k, v, tq, tk, tv = _autocast([q, k, v, tq, tk, tv])
    with torch.no_grad():
        out, t_out = _launch(q.detach(), k.detach(), v.detach(), tq.detach(), tk.detach(), tv.detach(),
                             config=config, precision=precision)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        out = _FlashAttention.apply(q, k, v, out, config, precision)
    return out, t_out


# ----------------------------------------------------------------------------
# Offline compilation (no GPU needed): catches front-end errors and reports registers / spills.


def compile_offline(head_dim: int = 64, dtype: torch.dtype = torch.bfloat16, has_tangent: bool = True,
                    config: KernelConfig | None = None, arch: int = 90, precision: str | None = None) -> dict:
    """Compile the kernel for CUDA sm_<arch> without a device (ptxas ships with Triton).

    Returns {"shared", "config", "resources": {registers, stack_bytes, hgmma, hmma, ldl} or None}.
    Triton's compile API changes between versions;
    callers should treat an exception as "could not check", not as a kernel bug, unless it is a
    CompilationError.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernel()
    cfg = config or candidate_configs(head_dim, dtype, has_tangent)[0]
    ty = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    names = kernel.arg_names
    signature, constexprs = {}, {}
    consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": _pow2_at_least(head_dim),
              "HAS_TANGENT": has_tangent, "PRECISION": precision or default_precision(dtype)}
    for name in names:
        if name in consts:
            signature[name] = "constexpr"
            constexprs[name] = consts[name]
        elif name in ("Q", "K", "V", "TQ", "TK", "TV", "O", "TO"):
            signature[name] = ty
        elif name in ("qk_scale", "t_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    info = {"shared": getattr(compiled.metadata, "shared", None), "config": cfg.__dict__, "resources": None}
    # Registers, stack (spills) and the matrix instructions, from the cubin with the cuobjdump Triton ships.
    import shutil
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    cubin = compiled.asm.get("cubin") if hasattr(compiled, "asm") else None
    if tool and cubin:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
            sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
        line = next((ln.strip() for ln in res.splitlines() if "REG:" in ln), "")
        fields = dict(kv.split(":", 1) for kv in line.split() if ":" in kv)
        info["resources"] = {"registers": int(fields.get("REG", -1)), "stack_bytes": int(fields.get("STACK", -1)),
                             "hgmma": sass.count("HGMMA"), "hmma": sass.count("HMMA"), "ldl": sass.count("LDL")}
    return info
