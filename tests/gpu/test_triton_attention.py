"""The fused Triton flash-attention JVP (scm/triton_attention.py) against the math reference.

Three tiers:
- CPU, always: importing never imports triton; argument validation; the PyTorch fallback tangent.
- CPU, Triton interpreter (TRITON_INTERPRET=1, in a subprocess so the flag is set before triton loads):
  the real kernel's math on tiny sizes, float32 and float16 (the interpreter's bf16 tl.dot is broken:
  bf16 is left to the GPU tier). Skipped when triton or its interpreter is unavailable.
- GPU (`gpu` marker, skipped without CUDA by tests/gpu/conftest.py): the compiled kernel.

Run this file as a script (`TRITON_INTERPRET=1 python tests/gpu/test_triton_attention.py`) to print the
interpreter checks as JSON; exit code 77 means "interpreter unavailable".
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # when run as a script
    sys.path.insert(0, str(ROOT))

from scm.attention import attention, attention_jvp, attention_math, attention_math_jvp  # noqa: E402
from scm.config import resolve  # noqa: E402
from scm.triton_attention import (  # noqa: E402
    _tangent_torch,
    candidate_configs,
    compile_offline,
    flash_attention,
    flash_attention_jvp,
    interpreter_mode,
)


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _inputs(B=1, H=2, M=64, N=None, D=32, dtype=torch.float32, device="cpu", seed=0):
    N = M if N is None else N
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = [(B, H, M, D), (B, H, N, D), (B, H, N, D)] * 2
    return [torch.randn(s, generator=g, device=device).to(dtype) for s in shapes]


def _network_layout(B, H, N, D, dtype=torch.float32, device="cpu", seed=0):
    """q, k, v, tq, tk, tv as the U-Net makes them: (B, H, D, 3, N) split and transposed (D-stride 3N)."""
    g = torch.Generator(device=device).manual_seed(seed)
    y, ty = (torch.randn(B, H, D, 3, N, generator=g, device=device).to(dtype) for _ in range(2))
    return [z.transpose(-1, -2) for z in y.unbind(3)] + [z.transpose(-1, -2) for z in ty.unbind(3)]


# ----------------------------------------------------------------------------
# CPU, always.


def test_importing_scm_does_not_import_triton():
    code = ("import sys; import scm.attention, scm.networks, scm.losses, scm.triton_attention; "
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_config_accepts_triton():
    cfg = resolve("shapes", "tS", "scd", {"network.attention": "triton"})
    assert cfg.network.attention == "triton"


def test_validation_errors():
    q, k, v, tq, tk, tv = _inputs()
    with pytest.raises(ValueError, match="B, H, N, D"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="same shape"):
        flash_attention(q, k, v[..., :10, :])
    with pytest.raises(ValueError, match="agree"):
        flash_attention(q[..., :16], k, v)
    with pytest.raises(ValueError, match="tangent"):
        flash_attention_jvp(q, k, v, tq[..., :5, :], tk, tv)
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention_jvp(q, k, v, tq.double(), tk, tv)
    with pytest.raises(ValueError, match="not supported"):
        flash_attention(q.double(), k.double(), v.double())
    big = torch.zeros(1, 1, 4, 300)
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(big, big, big)
    empty = torch.zeros(1, 2, 0, 32)
    with pytest.raises(ValueError, match="no keys"):
        flash_attention(q, empty, empty)


def test_cpu_tensors_need_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        flash_attention_jvp(*_inputs())
    with pytest.raises(RuntimeError, match="CUDA"):
        attention(*_inputs()[:3], impl="triton")
    with pytest.raises(RuntimeError, match="CUDA"):
        attention_jvp(*_inputs(), impl="triton")


def test_candidate_configs_are_valid():
    for D in (16, 32, 48, 64, 128, 256):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for has_t in (True, False):
                cfgs = candidate_configs(D, dtype, has_t)
                assert cfgs and len(set(cfgs)) == len(cfgs)
                for c in cfgs:  # tl.dot needs every tile side >= 16, powers of two
                    for n in (c.block_m, c.block_n):
                        assert n >= 16 and n & (n - 1) == 0


@pytest.mark.parametrize("M,N", [(37, 37), (23, 50)])
def test_torch_fallback_tangent_matches_math(M, N):
    # The jvp rule used under torch.func transforms (functorch wrappers cannot go to a Triton launch).
    xs = _inputs(B=2, H=3, M=M, N=N, D=8, dtype=torch.float64)
    _, ref = attention_math_jvp(*xs)
    got = _tangent_torch(*xs, chunk=16)
    assert got.dtype == torch.float64
    assert _rel(got, ref) < 1e-6  # the fallback computes in float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_compiles_offline_for_sm90(dtype):
    # The interpreter runs the kernel as Python and so cannot catch front-end (typing, scoping) errors;
    # compiling for sm_90 with the ptxas Triton ships needs no GPU and can.
    pytest.importorskip("triton")
    try:
        info = compile_offline(64, dtype, has_tangent=True)
    except Exception as exc:  # noqa: BLE001
        if "CompilationError" in type(exc).__name__:
            raise
        pytest.skip(f"offline compilation unavailable here: {type(exc).__name__}: {str(exc)[:200]}")
    res = info["resources"]
    if res is not None and dtype == torch.bfloat16:
        assert res["hgmma"] > 0  # Hopper's wgmma path
        # register spills are a performance matter (measured in bench/gpu_checks.py, not asserted):
        # Triton 3.8 spills nothing here, Triton 3.6 (on the GPU machine) 96 bytes


# ----------------------------------------------------------------------------
# CPU, Triton interpreter (subprocess).

INTERPRETER_CHECKS = ["fp32_square", "fp32_ragged", "fp32_cross_padded_d", "fp16", "network_layout",
                      "large_scores", "grad_precomputed", "grad_forward", "func_jvp", "dispatch",
                      "network_forward_with_tangent", "zero_queries"]


def _interpreter_checks() -> dict:
    """Run under TRITON_INTERPRET=1 (set before triton is imported). Returns {name: {ok, ...}}."""
    res = {}

    def record(name, ok, **info):
        res[name] = {"ok": bool(ok), **info}

    def jvp_case(name, xs, limit):
        out, t_out = flash_attention_jvp(*xs)
        ro, rt = attention_math_jvp(*[x.double() for x in xs])
        e_o, e_t = _rel(out, ro), _rel(t_out, rt)
        record(name, e_o < limit and e_t < limit and out.dtype == xs[0].dtype, rel_out=e_o, rel_t_out=e_t)

    jvp_case("fp32_square", _inputs(B=1, H=2, M=64, D=32, seed=1), 1e-5)
    jvp_case("fp32_ragged", _inputs(B=1, H=2, M=100, D=32, seed=2), 1e-5)
    jvp_case("fp32_cross_padded_d", _inputs(B=2, H=1, M=37, N=53, D=48, seed=3), 1e-5)
    jvp_case("fp16", _inputs(B=1, H=2, M=100, D=32, dtype=torch.float16, seed=4), 5e-3)
    jvp_case("network_layout", _network_layout(2, 2, 70, 32, seed=5), 1e-5)
    q, k, v, tq, tk, tv = _inputs(B=1, H=2, M=100, D=32, seed=6)
    jvp_case("large_scores", [10 * q, 10 * k, v, tq, tk, tv], 1e-4)

    # Gradients: out from the fused launch carries the graph (backward = SDPA recompute).
    q, k, v, tq, tk, tv = _inputs(B=2, H=2, M=90, D=32, seed=7)
    go = torch.randn_like(q)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    ref = torch.autograd.grad(attention_math(q, k, v), (q, k, v), go)
    out, t_out = flash_attention_jvp(q, k, v, tq, tk, tv)
    grads = torch.autograd.grad(out, (q, k, v), go)
    errs = [_rel(a, b) for a, b in zip(grads, ref)]
    record("grad_precomputed", max(errs) < 1e-5 and out.grad_fn is not None and not t_out.requires_grad,
           errs=errs)
    grads = torch.autograd.grad(flash_attention(q, k, v), (q, k, v), go)
    errs = [_rel(a, b) for a, b in zip(grads, ref)]
    record("grad_forward", max(errs) < 1e-5, errs=errs)

    # torch.func.jvp through flash_attention (forward by the kernel, tangent by the torch fallback).
    qd, kd, vd = (x.detach() for x in (q, k, v))
    o, t = torch.func.jvp(flash_attention, (qd, kd, vd), (tq, tk, tv))
    ro, rt = attention_math_jvp(qd, kd, vd, tq, tk, tv)
    record("func_jvp", _rel(o, ro) < 1e-5 and _rel(t, rt) < 1e-5, rel_out=_rel(o, ro), rel_t_out=_rel(t, rt))

    # The dispatch in scm.attention.
    xs = _inputs(B=1, H=2, M=50, D=16, seed=8)
    o1, t1 = attention_jvp(*xs, impl="triton")
    o2, t2 = attention_jvp(*xs, impl="math")
    o3 = attention(*xs[:3], impl="triton")
    record("dispatch", max(_rel(o1, o2), _rel(t1, t2), _rel(o3, o2)) < 1e-5)

    # A tiny U-Net: forward_with_tangent with triton attention equals math attention.
    from scm.networks import build_network

    cfg = resolve("shapes", "tS", "scd")
    torch.manual_seed(0)
    net = build_network(cfg.network, cfg.data, cfg.sigma_d).eval()
    with torch.no_grad():
        net.out_gain.fill_(1.0)
    B = 2
    x, tx = torch.randn(B, 3, 16, 16), torch.randn(B, 3, 16, 16)
    t, tt = torch.rand(B) * 1.5 + 0.01, torch.randn(B)
    labels = torch.randint(0, 8, (B,))
    F0, dF0 = net.forward_with_tangent(x, t, tx, tt, labels)
    for m in net.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl = "triton"
    F1, dF1 = net.forward_with_tangent(x, t, tx, tt, labels)
    record("network_forward_with_tangent", _rel(F1, F0) < 1e-5 and _rel(dF1, dF0) < 1e-5,
           rel_F=_rel(F1, F0), rel_dF=_rel(dF1, dF0))

    # No query rows: empty outputs, no launch.
    xs = _inputs(B=1, H=1, M=0, N=10, D=16)
    o, t = flash_attention_jvp(*xs)
    record("zero_queries", o.shape == (1, 1, 0, 16) and t.shape == (1, 1, 0, 16))
    return res


def _interpreter_available() -> str | None:
    """None if Triton's interpreter runs a trivial kernel here, else the reason it does not."""
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # noqa: BLE001
        return f"triton not importable: {exc}"

    @triton.jit
    def _add_one(X, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(X + i, tl.load(X + i) + 1.0)

    try:
        x = torch.zeros(16)
        _add_one[(1,)](x, BLOCK=16)
        assert bool((x == 1).all())
    except Exception as exc:  # noqa: BLE001
        return f"interpreter failed: {type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="module")
def interpreter_results():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode == 77:
        pytest.skip(f"Triton interpreter unavailable: {proc.stdout.strip()[-300:]}")
    assert proc.returncode == 0, f"interpreter checks crashed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", INTERPRETER_CHECKS)
def test_kernel_in_interpreter(interpreter_results, name):
    assert name in interpreter_results, sorted(interpreter_results)
    assert interpreter_results[name]["ok"], interpreter_results[name]


# ----------------------------------------------------------------------------
# GPU.

GPU_LIMITS = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D", [(256, 64), (1000, 64), (333, 32), (512, 128), (200, 48)])
def test_gpu_matches_math(dtype, N, D):
    xs = _inputs(B=2, H=3, M=N, D=D, dtype=dtype, device="cuda", seed=N + D)
    out, t_out = flash_attention_jvp(*xs)
    ro, rt = attention_math_jvp(*[x.double() for x in xs])
    assert out.dtype == dtype and t_out.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(t_out).all()
    assert _rel(out, ro) < GPU_LIMITS[dtype]
    assert _rel(t_out, rt) < GPU_LIMITS[dtype]
    fwd = flash_attention(*xs[:3])
    assert _rel(fwd, ro) < GPU_LIMITS[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_network_layout_and_cross_lengths(dtype):
    xs = _network_layout(2, 4, 300, 64, dtype=dtype, device="cuda", seed=1)
    out, t_out = flash_attention_jvp(*xs)
    ro, rt = attention_math_jvp(*[x.double() for x in xs])
    assert _rel(out, ro) < GPU_LIMITS[dtype] and _rel(t_out, rt) < GPU_LIMITS[dtype]
    xs = _inputs(B=2, H=2, M=77, N=301, D=64, dtype=dtype, device="cuda", seed=2)
    out, t_out = flash_attention_jvp(*xs)
    ro, rt = attention_math_jvp(*[x.double() for x in xs])
    assert _rel(out, ro) < GPU_LIMITS[dtype] and _rel(t_out, rt) < GPU_LIMITS[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_gradients(dtype):
    q, k, v, tq, tk, tv = _inputs(B=2, H=2, M=300, D=64, dtype=dtype, device="cuda", seed=3)
    go = torch.randn_like(q)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out, _ = flash_attention_jvp(q, k, v, tq, tk, tv)
    grads = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = torch.autograd.grad(attention_math(q64, k64, v64), (q64, k64, v64), go.double())
    for g, r in zip(grads, ref):
        assert _rel(g, r) < (1e-3 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
def test_gpu_autocast_and_func_jvp():
    q, k, v, tq, tk, tv = _inputs(B=1, H=2, M=128, D=64, device="cuda", seed=4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, t_out = attention_jvp(q, k, v, tq, tk, tv, impl="triton")
    assert out.dtype == torch.bfloat16 and t_out.dtype == torch.bfloat16
    ro, rt = attention_math_jvp(q.double(), k.double(), v.double(), tq.double(), tk.double(), tv.double())
    assert _rel(out, ro) < 1e-2 and _rel(t_out, rt) < 1e-2
    o, t = torch.func.jvp(flash_attention, (q, k, v), (tq, tk, tv))
    assert _rel(o, ro) < 1e-3 and _rel(t, rt) < 1e-3


@pytest.mark.gpu
def test_gpu_network_triton_matches_math():
    from scm.networks import build_network

    cfg = resolve("shapes", "tS", "scd")
    torch.manual_seed(0)
    with torch.device("cuda"):
        net = build_network(cfg.network, cfg.data, cfg.sigma_d)
    net = net.cuda().eval()
    with torch.no_grad():
        net.out_gain.fill_(1.0)
    B = 4
    x, tx = torch.randn(B, 3, 16, 16, device="cuda"), torch.randn(B, 3, 16, 16, device="cuda")
    t, tt = torch.rand(B, device="cuda") * 1.5 + 0.01, torch.randn(B, device="cuda")
    F0, dF0 = net.forward_with_tangent(x, t, tx, tt)
    for m in net.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl = "triton"
    F1, dF1 = net.forward_with_tangent(x, t, tx, tt)
    assert _rel(F1, F0) < 1e-3 and _rel(dF1, dF0) < 1e-3
    assert math.isfinite(float(dF1.norm()))


if __name__ == "__main__":
    reason = _interpreter_available() if interpreter_mode() else "TRITON_INTERPRET is not 1"
    if reason:
        print(reason)
        sys.exit(77)
    print(json.dumps(_interpreter_checks()))
