"""GPU checks in one device call (bench/gpu_checks.py): the fused attention kernel's accuracy, timings and
memory, fp16 safety of sCD training steps, the network's JVP.

Sections (each takes a GpuChecks, appends its rows to `checks.results` as it goes, so a run cut short keeps
what it measured, and returns them):
  hardware   device name, torch / triton / CUDA versions, measured bf16 matmul rate and copy bandwidth
  accuracy   Triton fused out / t_out vs math JVP in float64 on fresh random inputs; float32 < 1e-3,
             bf16 / fp16 < 1e-2 (16-bit kernel against the float64 reference of the same rounded inputs)
  attention  timings (median [min, max] of >= 10 repeats, CUDA events): Triton fused JVP, Triton forward,
             torch SDPA forward, math JVP, at N = 1024, 4096, 16384; peak memory fused vs math at N = 4096
  training   sCD steps at size S (imagenet512 preset) in bf16 and fp16, JVP rearrangement on/off: non-finite
             counts in the tangent cs_dF (ConsistencyLoss.on_tangent) and the loss, GradScaler skips, step
             time; a deterministic fp16 probe of jvp_tangent at t forced near 0 and pi/2; step time of
             teacher / sCT / sCD (bf16)
  network    forward_with_tangent vs torch.func.jvp (float32 reference) at size S in bf16

dry_run: CPU, tiny sizes, kernels in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported): every code path, numbers meaningless. Triton is imported only through scm.triton_attention's
launches, so importing this module stays cheap. `markdown` renders the results.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from scm import triton_attention
from scm.attention import attention_math, attention_math_jvp
from scm.bench.common import _stats, _sync, _timed, hardware
from scm.config import Config, resolve
from scm.losses import Tangent, build_loss, jvp_tangent
from scm.networks import build_network
from scm.trigflow import add_noise, sample_t

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LIMITS = {"fp32": 1e-3, "bf16": 1e-2, "fp16": 1e-2}


class TritonSkipped(RuntimeError):
    """Raised in place of a Triton launch after the canary failed."""


def empty_results() -> dict:
    return {"meta": {}, "hardware": {}, "accuracy": [], "attention_timing": [], "attention_memory": {},
            "kernel_configs": [], "training_nonfinite": [], "fp16_probe": [], "step_times": [],
            "network_jvp": [], "errors": []}


@dataclass
class GpuChecks:
    """One run's settings and results; every section function takes it."""

    dry_run: bool = False
    budget_s: float = 270.0  # soft: optional parts are skipped once it is spent
    batch: int = 16  # batch of the size-S training steps
    steps: int = 10  # measured training steps per setting
    on_update: Callable[[], None] | None = None  # after every logged line (the script rewrites its summaries)
    triton_skipped: str = ""  # why Triton launches are skipped (the canary failed); empty: they run
    results: dict = field(default_factory=empty_results)
    t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.results["meta"].setdefault("dry_run", self.dry_run)
        self.device = torch.device("cpu" if self.dry_run or not torch.cuda.is_available() else "cuda")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def say(self, msg: str) -> None:
        log.info(msg)
        self.updated()

    def updated(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        if self.on_update is not None:
            self.on_update()  # cheap; a run killed by its timeout still leaves everything measured so far

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def error(self, where: str, exc: BaseException) -> None:
        if isinstance(exc, TritonSkipped):
            self.results.setdefault("skipped", []).append({"where": where, "why": str(exc)})
            self.say(f"SKIPPED {where}: {exc}")
            return
        tb = traceback.format_exc(limit=6)
        self.results["errors"].append({"where": where, "error": f"{type(exc).__name__}: {exc}"[:2000],
                                       "traceback": tb})
        self.say(f"ERROR in {where}: {type(exc).__name__}: {str(exc)[:400]}")
        if self.cuda:
            torch.cuda.empty_cache()

    def triton(self):
        """scm.triton_attention, or TritonSkipped once the canary failed (keeps the CUDA context alive)."""
        if self.triton_skipped:
            raise TritonSkipped(self.triton_skipped)
        return triton_attention


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def fmt_ms(t: dict | None) -> str:
    if not t:
        return "n/a"
    if "skipped" in t:
        return t["skipped"]
    return f"{t['median_ms']:.3f} [{t['min_ms']:.3f}, {t['max_ms']:.3f}]"


def _ms_row(times_ms: list[float]) -> dict:
    med, lo, hi = _stats(times_ms)
    return {"median_ms": med, "min_ms": lo, "max_ms": hi, "reps": len(times_ms)}


def time_fn(checks: GpuChecks, fn, warmup: int = 3, min_reps: int = 10, max_reps: int = 100,
            target_s: float = 0.5) -> dict:
    """Median / min / max milliseconds: CUDA events per call on the GPU, perf_counter on the CPU."""
    dev = checks.device
    for _ in range(warmup):
        fn()
    est = max(_timed(fn, dev), 1e-6)
    reps = int(min(max_reps, max(min_reps, target_s / est)))
    if checks.dry_run:
        reps = min(reps, 3)
    times = []
    for _ in range(reps):
        if checks.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(_timed(fn, dev) * 1e3)
    return _ms_row(times)


# ----------------------------------------------------------------------------
# The canary: every kernel variant once, run in a subprocess by the script.


def canary(dry_run: bool) -> dict:
    """Launch every kernel variant once; {dtype and N: relative errors}. Raises on a failed launch.

    Meant for a subprocess: a faulting kernel (illegal address) kills the CUDA context for good, so the
    main process tries Triton only after this succeeded. Compiled kernels land in Triton's on-disk cache,
    so the main process does not compile them again.
    """
    dev = "cpu" if dry_run else "cuda"
    report = {}
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        if dev == "cpu" and dt == torch.bfloat16:
            continue  # the interpreter's bf16 dot is broken
        for shape in ((2, 3, 300, 64), (1, 2, 256, 64)):  # ragged and block-aligned N
            g = torch.Generator(device=dev).manual_seed(0)
            xs = [torch.randn(*shape, device=dev, generator=g).to(dt) for _ in range(6)]
            out, t_out = triton_attention.flash_attention_jvp(*xs)
            fwd = triton_attention.flash_attention(*xs[:3])
            _sync(torch.device(dev))
            ref, t_ref = attention_math_jvp(*[x.double() for x in xs])
            report[f"{dt} N={shape[2]}"] = {
                "rel_out": float((out.double() - ref).norm() / ref.norm()),
                "rel_t_out": float((t_out.double() - t_ref).norm() / t_ref.norm()),
                "rel_fwd": float((fwd.double() - ref).norm() / ref.norm())}
    return report


# ----------------------------------------------------------------------------
# Hardware.


def hardware_section(checks: GpuChecks) -> dict:
    """Versions, device properties and (CUDA) measured ceilings: a large bf16 matmul, a device copy."""
    hw = checks.results["hardware"]
    hw["python"] = platform.python_version()
    hw["torch"] = torch.__version__
    try:
        import triton

        hw["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        hw["triton"] = f"not importable: {exc}"
    hw["cuda"] = torch.version.cuda
    hw["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    hw["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    hw["machine"] = hardware()
    if not checks.cuda:
        hw["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores): dry run"
        checks.say(f"hardware: {hw}")
        return hw
    hw["device"] = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    hw["capability"] = f"{props.major}.{props.minor}"
    hw["sm_count"] = props.multi_processor_count
    hw["memory_gib"] = round(props.total_memory / 2**30, 1)
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,temperature.gpu,"
                            "power.draw", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        hw["nvidia_smi"] = q.stdout.strip()
        hw["driver"] = q.stdout.split(",")[0].strip()
    except Exception as exc:  # noqa: BLE001
        hw["nvidia_smi"] = f"n/a ({exc})"
    checks.say(f"hardware: {hw['device']} (sm {hw['capability']}, {hw['sm_count']} SMs, {hw['memory_gib']} GiB), "
               f"torch {hw['torch']}, triton {hw['triton']}, CUDA {hw['cuda']}, driver {hw.get('driver')}")
    dev = checks.device
    n = 8192
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = time_fn(checks, lambda: a @ b, min_reps=10, target_s=0.3)
    hw["matmul_bf16_tflops"] = 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12
    x = torch.randn(2**28, device=dev)  # 1 GiB fp32
    y = torch.empty_like(x)
    t = time_fn(checks, lambda: y.copy_(x), min_reps=10, target_s=0.3)
    hw["copy_gbps"] = 2 * x.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9
    a = b = x = y = None  # free before the next section
    torch.cuda.empty_cache()
    checks.say(f"ceilings: bf16 matmul {hw['matmul_bf16_tflops']:.0f} TFLOP/s, copy {hw['copy_gbps']:.0f} GB/s")
    return hw


# ----------------------------------------------------------------------------
# (a) Accuracy of the fused kernel.


def _inputs(dev, B, H, N, D, dtype, seed, layout="contiguous"):
    g = torch.Generator(device=dev).manual_seed(seed)
    if layout == "network":  # the U-Net's layout: (B, H, D, 3, N) split and transposed, D-stride 3N
        y = torch.randn(B, H, D, 3, N, device=dev, generator=g).to(dtype)
        ty = torch.randn(B, H, D, 3, N, device=dev, generator=g).to(dtype)
        return [z.transpose(-1, -2) for z in y.unbind(3)] + [z.transpose(-1, -2) for z in ty.unbind(3)]
    return [torch.randn(B, H, N, D, device=dev, generator=g).to(dtype) for _ in range(6)]


def accuracy(checks: GpuChecks) -> list[dict]:
    """Fused out / t_out (and flash_attention's gradients) against the float64 math reference."""
    dry, dev, rows = checks.dry_run, checks.device, checks.results["accuracy"]
    if dry:
        cases = [("fp32", 1, 2, 64, 32, "contiguous"), ("fp32", 1, 2, 100, 32, "contiguous"),
                 ("fp32", 2, 1, 100, 48, "network"), ("fp16", 1, 2, 100, 32, "contiguous"),
                 ("bf16", 1, 2, 64, 32, "contiguous")]
    else:
        cases = [(dt, 4, 8, n, 64, "contiguous") for dt in ("fp32", "bf16", "fp16") for n in (256, 1024, 4096)]
        cases += [("bf16", 4, 8, 1000, 64, "contiguous"), ("bf16", 4, 8, 1024, 32, "contiguous"),
                  ("bf16", 4, 8, 1024, 128, "contiguous"), ("fp32", 4, 8, 1000, 128, "contiguous"),
                  ("bf16", 4, 9, 256, 64, "network"), ("fp16", 2, 4, 777, 48, "network")]
    for i, (dt, B, H, N, D, layout) in enumerate(cases):
        row = {"dtype": dt, "B": B, "H": H, "N": N, "D": D, "layout": layout}
        if dry and dt == "bf16":
            row["skipped"] = "Triton's interpreter has no bf16 tl.dot (garbage); checked on the GPU"
            rows.append(row)
            checks.say(f"accuracy {dt} N={N}: SKIPPED ({row['skipped']})")
            continue
        if checks.left() < 60 and i > 0:
            row["skipped"] = "time budget"
            rows.append(row)
            continue
        try:
            xs = _inputs(dev, B, H, N, D, DTYPES[dt], seed=1000 + i, layout=layout)
            with torch.no_grad():
                t = time.perf_counter()
                out, t_out = checks.triton().flash_attention_jvp(*xs)
                _sync(dev)
                row["first_call_s"] = round(time.perf_counter() - t, 2)
                ref_out, ref_t = attention_math_jvp(*[x.double() for x in xs])
            row["rel_out"], row["rel_t_out"] = rel(out, ref_out), rel(t_out, ref_t)
            row["finite"] = bool(torch.isfinite(out).all() and torch.isfinite(t_out).all())
            row["limit"] = LIMITS[dt]
            row["pass"] = row["finite"] and row["rel_out"] < row["limit"] and row["rel_t_out"] < row["limit"]
            row["out_dtype"] = str(out.dtype)
            if dt == "fp32" and N == 1024 and not dry:  # context: plain fp32 math vs float64
                m_out, m_t = attention_math_jvp(*xs)
                row["math_fp32_rel_out"], row["math_fp32_rel_t_out"] = rel(m_out, ref_out), rel(m_t, ref_t)
            del xs, out, t_out, ref_out, ref_t
        except Exception as exc:  # noqa: BLE001
            checks.error(f"accuracy {dt} N={N} D={D} {layout}", exc)
            row.update(rel_out=float("nan"), rel_t_out=float("nan"), limit=LIMITS[dt], error=str(exc)[:300])
            row["pass"] = False
        rows.append(row)
        checks.say(f"accuracy {dt:4s} B={B} H={H} N={N:5d} D={D:3d} {layout:10s}: out {row['rel_out']:.2e}, "
                   f"t_out {row['rel_t_out']:.2e} (limit {row['limit']:.0e}) {'PASS' if row['pass'] else 'FAIL'}")
    # Other fp32 input precisions, for context (one case).
    if not dry and checks.left() > 60:
        for prec in ("ieee", "tf32"):
            try:
                xs = _inputs(dev, 4, 8, 1024, 64, torch.float32, seed=77)
                with torch.no_grad():
                    out, t_out = checks.triton().flash_attention_jvp(*xs, precision=prec)
                    ref_out, ref_t = attention_math_jvp(*[x.double() for x in xs])
                r = {"dtype": f"fp32 ({prec})", "B": 4, "H": 8, "N": 1024, "D": 64, "layout": "contiguous",
                     "rel_out": rel(out, ref_out), "rel_t_out": rel(t_out, ref_t), "limit": 1e-3 if prec == "ieee"
                     else 1e-2}
                r["pass"] = r["rel_out"] < r["limit"] and r["rel_t_out"] < r["limit"]
                rows.append(r)
                checks.say(f"accuracy fp32 precision={prec}: out {r['rel_out']:.2e}, t_out {r['rel_t_out']:.2e}")
            except Exception as exc:  # noqa: BLE001
                checks.error(f"accuracy fp32 precision={prec}", exc)
    # Gradients through flash_attention (backward = SDPA recompute) vs math.
    for dt in (["fp32"] if dry else ["fp32", "bf16"]):
        try:
            B, H, N, D = (1, 2, 100, 32) if dry else (2, 4, 1024, 64)
            q, k, v, go = _inputs(dev, B, H, N, D, DTYPES[dt], seed=5)[:4]
            q, k, v = (x.requires_grad_(True) for x in (q, k, v))
            grads = torch.autograd.grad(checks.triton().flash_attention(q, k, v), (q, k, v), go)
            q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
            ref = torch.autograd.grad(attention_math(q64, k64, v64), (q64, k64, v64), go.double())
            errs = [rel(a, b) for a, b in zip(grads, ref)]
            ok = max(errs) < (1e-3 if dt == "fp32" else 2e-2)
            rows.append({"dtype": dt, "B": B, "H": H, "N": N, "D": D, "layout": "grad dq,dk,dv",
                         "rel_out": max(errs), "rel_t_out": float("nan"),
                         "limit": 1e-3 if dt == "fp32" else 2e-2, "pass": ok})
            checks.say(f"gradient {dt}: rel err dq, dk, dv = {', '.join(f'{e:.2e}' for e in errs)} "
                       f"{'PASS' if ok else 'FAIL'}")
        except Exception as exc:  # noqa: BLE001
            checks.error(f"gradient {dt}", exc)
    return rows


# ----------------------------------------------------------------------------
# (b) Attention timing and memory.


def attention(checks: GpuChecks) -> list[dict]:
    """Timing rows per N (fused JVP, Triton forward, SDPA forward, math JVP); on CUDA also the peak memory
    at N = 4096 (results["attention_memory"]) and a few launch configurations (results["kernel_configs"])."""
    dry, dev, rows = checks.dry_run, checks.device, checks.results["attention_timing"]
    B, H, D = (1, 2, 32) if dry else (4, 8, 64)
    Ns = (64, 128) if dry else (1024, 4096, 16384)
    dt = torch.float32 if dry else torch.bfloat16
    for N in Ns:
        row = {"N": N, "B": B, "H": H, "D": D, "dtype": str(dt), "jvp_flops": 6 * 2 * B * H * N * N * D,
               "fwd_flops": 2 * 2 * B * H * N * N * D}
        if checks.left() < 45:
            row["triton_jvp"] = {"skipped": "time budget"}
            rows.append(row)
            continue
        xs = _inputs(dev, B, H, N, D, dt, seed=N)
        with torch.no_grad():
            for name, fn in (("triton_jvp", lambda xs=xs: checks.triton().flash_attention_jvp(*xs)),
                             ("triton_fwd", lambda xs=xs: checks.triton().flash_attention(*xs[:3])),
                             ("sdpa_fwd", lambda xs=xs: F.scaled_dot_product_attention(*xs[:3]))):
                try:
                    row[name] = time_fn(checks, fn)
                    checks.say(f"timing N={N:5d} {name:10s}: {fmt_ms(row[name])} ms")
                except Exception as exc:  # noqa: BLE001
                    checks.error(f"timing N={N} {name}", exc)
                    row[name] = {"skipped": f"error {type(exc).__name__}"}
            # Math JVP materializes ~6 N x N tensors; skip where that cannot fit.
            need = 6 * B * H * N * N * (2 if dt != torch.float32 else 4)
            free = torch.cuda.mem_get_info()[0] if checks.cuda else float("inf")
            if need > 0.9 * free:
                row["math_jvp"] = {"skipped": f"OOM expected (~{need / 2**30:.0f} GiB > free {free / 2**30:.0f} GiB)"}
                checks.say(f"timing N={N:5d} math_jvp  : {row['math_jvp']['skipped']}")
            elif checks.left() < 40:
                row["math_jvp"] = {"skipped": "time budget"}
            else:
                try:
                    row["math_jvp"] = time_fn(checks, lambda xs=xs: attention_math_jvp(*xs), min_reps=10,
                                              target_s=0.5)
                    checks.say(f"timing N={N:5d} math_jvp  : {fmt_ms(row['math_jvp'])} ms")
                except torch.cuda.OutOfMemoryError as exc:
                    row["math_jvp"] = {"skipped": "OOM"}
                    checks.say(f"timing N={N:5d} math_jvp  : OOM ({str(exc)[:100]})")
                    torch.cuda.empty_cache()
                except Exception as exc:  # noqa: BLE001
                    checks.error(f"timing N={N} math_jvp", exc)
                    row["math_jvp"] = {"skipped": f"error {type(exc).__name__}"}
        if "median_ms" in row.get("triton_jvp", {}):
            checks.say(f"timing N={N:5d}: fused JVP {row['jvp_flops'] / row['triton_jvp']['median_ms'] / 1e9:.1f} "
                       "TFLOP/s")
        rows.append(row)
        xs = None
        if checks.cuda:
            torch.cuda.empty_cache()
        checks.updated()
    if checks.cuda:
        _attention_memory(checks, B, H, D, dt)
    if checks.cuda and checks.left() > 90:
        _kernel_configs(checks, B, H, D, dt)
    return rows


def _attention_memory(checks: GpuChecks, B, H, D, dt) -> None:
    """Peak memory at N = 4096 (bf16): fused vs math vs SDPA forward."""
    N = 4096
    xs = _inputs(checks.device, B, H, N, D, dt, seed=4096)
    mem = {"N": N}
    with torch.no_grad():
        for name, fn in (("triton_jvp", lambda: checks.triton().flash_attention_jvp(*xs)),
                         ("sdpa_fwd", lambda: F.scaled_dot_product_attention(*xs[:3])),
                         ("math_jvp", lambda: attention_math_jvp(*xs))):
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                res = fn()
                torch.cuda.synchronize()
                mem[name] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
                del res
            except Exception as exc:  # noqa: BLE001
                checks.error(f"memory {name}", exc)
    if mem.get("triton_jvp") is not None and mem.get("math_jvp"):
        mem["ratio_fused_over_math"] = mem["triton_jvp"] / mem["math_jvp"]
    checks.results["attention_memory"] = mem
    checks.say(f"memory N=4096 (MiB above inputs): {mem}")
    xs = None
    torch.cuda.empty_cache()


def _kernel_configs(checks: GpuChecks, B, H, D, dt) -> None:
    """A few launch configurations of the fused JVP (bf16, D = 64, N = 4096)."""
    N = 4096
    xs = _inputs(checks.device, B, H, N, D, dt, seed=7)
    K = triton_attention.KernelConfig
    for cfg in (K(128, 64, 8, 2), K(64, 64, 4, 2), K(128, 32, 8, 2), K(64, 32, 4, 1), K(128, 64, 8, 3)):
        r = {"config": cfg.__dict__}
        try:
            with torch.no_grad():
                r["time"] = time_fn(checks, lambda cfg=cfg: checks.triton().flash_attention_jvp(*xs, config=cfg))
            checks.say(f"config {cfg}: {fmt_ms(r['time'])} ms")
        except Exception as exc:  # noqa: BLE001
            r["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            checks.say(f"config {cfg}: {r['error']}")
        checks.results["kernel_configs"].append(r)
        if checks.left() < 60:
            break
    xs = None
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------
# (c) Training steps at size S.


def _size_cfg(checks: GpuChecks, method: str, attention: str = "math") -> Config:
    over = {"run.batch_size": checks.batch, "network.attention": attention}
    if checks.dry_run:  # same preset, tiny width and 16x16 latents (attention still at 16x16 and 8x8): CPU-sized
        over["network.model_channels"] = 16
        over["data.resolution"] = 16
        over["run.batch_size"] = 2
    return resolve("imagenet512", "S", method, over)


def _build(checks: GpuChecks, cfg: Config, out_gain: float | None = 1.0):
    torch.manual_seed(0)
    with torch.device(checks.device):
        net = build_network(cfg.network, cfg.data, cfg.sigma_d)
    net = net.to(checks.device)
    if out_gain is not None:  # EDM2 zero-initializes out_gain (F = 0); a trained-like net has F != 0
        with torch.no_grad():
            net.out_gain.fill_(out_gain)
    return net


def _batch(dev, cfg: Config, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    B, ch, res = cfg.run.batch_size, cfg.data.channels, cfg.data.resolution
    x0 = torch.randn(B, ch, res, res, device=dev, generator=g) * cfg.sigma_d
    labels = torch.randint(0, cfg.data.label_dim, (B,), device=dev, generator=g)
    return x0, labels


class TangentCounter:
    """ConsistencyLoss.on_tangent observer: non-finite elements and the largest finite |cs_dF| per step.

    Keeps device tensors (no synchronization inside the step); summary() reads them once.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.nonfinite, self.absmax, self.calls = [], [], 0

    def __call__(self, tan: Tangent) -> None:
        fin = torch.isfinite(tan.cs_dF)
        self.nonfinite.append((~fin).sum())
        self.absmax.append(torch.where(fin, tan.cs_dF, torch.zeros_like(tan.cs_dF)).abs().max().float())
        self.calls += 1

    def summary(self) -> dict:
        nf = [int(x) for x in self.nonfinite]
        return {"nonfinite_tangent_elems": sum(nf), "steps_nonfinite_tangent": sum(1 for x in nf if x),
                "max_abs_tangent": max((float(x) for x in self.absmax), default=float("nan"))}


def _make_step(dev, cfg: Config, net, loss_fn, precision: str):
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    opt = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                           eps=cfg.optim.eps)
    state = {"i": 0, "bad_loss": 0, "skips": 0}

    def step():
        x0, labels = _batch(dev, cfg, seed=state["i"])
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss, diag = loss_fn(net, x0, labels, step=10**9)  # past warmup: r = 1
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.scale(loss.float().mean()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))
        scaler.step(opt)
        scaler.update()
        if not math.isfinite(diag["loss"]):
            state["bad_loss"] += 1
        if scaler.is_enabled() and scaler.get_scale() < scale:
            state["skips"] += 1

    return step, state


def training(checks: GpuChecks) -> list[dict]:
    """sCD steps in bf16 / fp16, rearrangement on / off, c_noise t / log_sigma: non-finite tangents and losses,
    scaler skips, step time (results["training_nonfinite"], returned); then the fp16 probe
    (results["fp16_probe"]) and the step times of teacher / sCT / sCD (results["step_times"])."""
    dry, dev, rows = checks.dry_run, checks.device, checks.results["training_nonfinite"]
    steps = 2 if dry else checks.steps
    warm = 1 if dry else 2
    precisions = ["bf16", "fp16"]
    cfg = _size_cfg(checks, "scd")
    student0 = _build(checks, cfg)
    init_state = {k: v.clone() for k, v in student0.state_dict().items()}
    params_m = sum(p.numel() for p in student0.parameters()) / 1e6
    teacher = copy.deepcopy(student0).eval().requires_grad_(False)
    checks.say(f"training: imagenet512 size S{' (dry: width 16)' if dry else ''}, {params_m:.1f} M params, "
               f"batch {cfg.run.batch_size}, sCD guidance U[{cfg.loss.guidance_min}, {cfg.loss.guidance_max}], "
               f"P=({cfg.loss.P_mean}, {cfg.loss.P_std})")
    counter = TangentCounter()
    # sCM's c_noise = t first; then EDM's c_noise = log(sigma_d tan t), whose d c_noise/dt = 1/(sin t cos t)
    # is the blow-up that the rearrangement guards against in fp16.
    settings = [(p, r, "t") for p in precisions for r in (True, False)]
    settings += [("fp16", r, "log_sigma") for r in (True, False)]
    for precision, rearr, c_noise in settings:
        row = {"precision": precision, "rearranged": rearr, "attention": cfg.network.attention,
               "c_noise": c_noise, "size": cfg.run.size, "batch": cfg.run.batch_size, "params_m": params_m}
        if checks.left() < 40:
            row["error"] = "skipped: time budget"
            rows.append(row)
            continue
        try:
            student0.load_state_dict(init_state)
            student0.train()
            student0.cfg.c_noise = teacher.cfg.c_noise = c_noise
            lcfg = copy.deepcopy(cfg.loss)
            lcfg.jvp_rearrangement = rearr
            loss_fn = build_loss("scd", lcfg, cfg.sigma_d, teacher)
            loss_fn.on_tangent = counter
            step, state = _make_step(dev, cfg, student0, loss_fn, precision)
            for _ in range(warm):
                step()
            counter.reset()
            state.update(bad_loss=0, skips=0)
            times = [_timed(step, dev) * 1e3 for _ in range(steps)]
            if counter.calls == 0:
                raise RuntimeError("ConsistencyLoss.on_tangent saw no tangent: the loss no longer reports its "
                                   "JVP (not continuous time?); counts would be meaningless")
            row.update(counter.summary())
            row.update(steps=steps, nonfinite_loss_steps=state["bad_loss"], scaler_skips=state["skips"],
                       time=_ms_row(times))
            checks.say(f"sCD {precision} c_noise={c_noise} rearranged={rearr}: non-finite cs_dF elems "
                       f"{row['nonfinite_tangent_elems']} "
                       f"in {row['steps_nonfinite_tangent']}/{steps} steps, non-finite loss steps "
                       f"{state['bad_loss']}, scaler skips {state['skips']}, max|cs_dF| "
                       f"{row['max_abs_tangent']:.3g}, step {fmt_ms(row['time'])} ms")
        except Exception as exc:  # noqa: BLE001
            checks.error(f"training sCD {precision} c_noise={c_noise} rearranged={rearr}", exc)
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        checks.updated()
    student0.cfg.c_noise = teacher.cfg.c_noise = "t"

    try:
        fp16_probe(checks, student0, teacher, cfg)
    except Exception as exc:  # noqa: BLE001
        checks.error("fp16 probe", exc)
    del student0, teacher, init_state
    if checks.cuda:
        torch.cuda.empty_cache()
    checks.updated()

    if checks.left() < 50:
        checks.results["step_times"].append({"method": "all", "attention": "", "error": "skipped: time budget"})
        return rows
    try:
        step_times(checks)
    except Exception as exc:  # noqa: BLE001
        checks.error("step times", exc)
    return rows


def fp16_probe(checks: GpuChecks, student, teacher, cfg: Config) -> list[dict]:
    """jvp_tangent at forced t (near 0 and pi/2) in fp16 autocast vs float32, rearranged or not."""
    dev, rows = checks.device, checks.results["fp16_probe"]
    net = copy.deepcopy(student).eval()
    B = min(cfg.run.batch_size, 8)
    x0, labels = _batch(dev, cfg, seed=123)
    x0, labels = x0[:B], labels[:B]
    z = torch.randn(x0.shape, device=dev, generator=torch.Generator(device=dev).manual_seed(9)) * cfg.sigma_d
    ts = [2e-4, 1e-3, 1e-2, 0.5, math.pi / 2 - 1e-2, math.pi / 2 - 1e-3, math.pi / 2 - 2e-4]
    for c_noise in ("t", "log_sigma"):
        net.cfg.c_noise = c_noise
        teacher.cfg.c_noise = c_noise
        for tv in ts:
            t = torch.full((B,), tv, device=dev)
            x_t = add_noise(x0, z, t)
            with torch.no_grad():
                dxdt = cfg.sigma_d * teacher(x_t / cfg.sigma_d, t, labels, None)
                ref = {}
                for rearr in (True, False):
                    tan = jvp_tangent(net, x_t, t, dxdt, cfg.sigma_d, labels, None, rearranged=rearr)
                    ref[rearr] = tan.cs_dF.float()
                # raw dF/dt (fp32) magnitude: the unrearranged tangent before scaling by cos t sin t sigma_d
                raw = jvp_tangent(net, x_t, t, dxdt, cfg.sigma_d, labels, None, rearranged=False)
                cs = (torch.cos(t) * torch.sin(t) * cfg.sigma_d).reshape(-1, 1, 1, 1)
                raw_absmax = float((raw.cs_dF / cs).abs().max())
                for rearr in (True, False):
                    row = {"c_noise": c_noise, "t": tv, "rearranged": rearr}
                    try:
                        with torch.autocast(dev.type, dtype=torch.float16):
                            tan = jvp_tangent(net, x_t, t, dxdt, cfg.sigma_d, labels, None, rearranged=rearr)
                        val = tan.cs_dF.float()
                        fin = torch.isfinite(val)
                        finite_val = torch.where(fin, val, 0)
                        row.update(nonfinite=int((~fin).sum()), max_abs=float(finite_val.abs().max()),
                                   raw_dF_absmax_fp32=raw_absmax,
                                   rel_err=rel(finite_val, ref[rearr]) if bool(fin.all()) else float("inf"))
                        checks.say(f"probe fp16 c_noise={c_noise:9s} t={tv:.6g} rearranged={rearr!s:5s}: "
                                   f"non-finite {row['nonfinite']}, max|cs_dF| {row['max_abs']:.3g}, raw max|dF| "
                                   f"{raw_absmax:.3g}, rel err vs fp32 {row['rel_err']:.2e}")
                    except Exception as exc:  # noqa: BLE001
                        checks.error(f"probe c_noise={c_noise} t={tv} rearranged={rearr}", exc)
                        row["error"] = f"{type(exc).__name__}: {exc}"
                    rows.append(row)
            if checks.left() < 30:
                break
    net.cfg.c_noise = teacher.cfg.c_noise = "t"
    return rows


def step_times(checks: GpuChecks) -> list[dict]:
    """Step time of teacher / sCT / sCD (math and Triton attention) in bf16, interleaved repeats."""
    dry, dev, rows = checks.dry_run, checks.device, checks.results["step_times"]
    reps = 2 if dry else checks.steps
    warm = 1 if dry else 2
    setups = [("teacher", "math"), ("sct", "math"), ("scd", "math"), ("scd", "triton")]
    fns = {}
    for method, attn in setups:
        try:
            if attn == "triton":
                checks.triton()  # TritonSkipped after a failed canary
            cfg = _size_cfg(checks, method, attn)
            net = _build(checks, cfg).train()
            teacher = copy.deepcopy(net).eval().requires_grad_(False) if method == "scd" else None
            loss_fn = build_loss(method, cfg.loss, cfg.sigma_d, teacher)
            step, _ = _make_step(dev, cfg, net, loss_fn, "bf16")
            fns[(method, attn)] = (step, sum(p.numel() for p in net.parameters()) / 1e6, cfg.run.batch_size)
        except Exception as exc:  # noqa: BLE001
            checks.error(f"step setup {method} {attn}", exc)
    times = {key: [] for key in fns}
    failed = set()
    for rep in range(warm + reps):
        for key, (step, _, _) in fns.items():
            if key in failed:
                continue
            try:
                ms = _timed(step, dev) * 1e3
                if rep >= warm:
                    times[key].append(ms)
            except Exception as exc:  # noqa: BLE001
                checks.error(f"step {key}", exc)
                failed.add(key)
        if checks.left() < 20:
            break
    teacher_times = times.get(("teacher", "math"))
    base = _stats(teacher_times)[0] if teacher_times else None
    for key, (_, params_m, batch) in fns.items():
        row = {"method": key[0], "attention": key[1], "params_m": params_m, "batch": batch}
        ts = times[key]
        if ts:
            row["time"] = _ms_row(ts)
            if base:
                row["ratio_to_teacher"] = row["time"]["median_ms"] / base
            checks.say(f"step time bf16 {key[0]:7s} attention={key[1]:6s}: {fmt_ms(row['time'])} ms, "
                       f"ratio to teacher {row.get('ratio_to_teacher', float('nan')):.2f}")
        else:
            row["error"] = "failed" if key in failed else "no repeats (time budget)"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------
# (d) Network JVP: forward_with_tangent vs torch.func.jvp.


def network(checks: GpuChecks) -> list[dict]:
    """F and dF of each variant (manual / func.jvp, fp32 / bf16 / fp16, math / Triton attention) against
    torch.func.jvp in float32 with math attention, at size S in eval mode."""
    dry, dev, rows = checks.dry_run, checks.device, checks.results["network_jvp"]
    cfg = _size_cfg(checks, "scd", "math")
    net = _build(checks, cfg).eval()
    B = 2 if dry else 4
    x0, labels = _batch(dev, cfg, seed=321)
    x0, labels = x0[:B], labels[:B]
    t = sample_t(B, cfg.loss.P_mean, cfg.loss.P_std, cfg.sigma_d, device=dev)
    z = torch.randn_like(x0) * cfg.sigma_d
    x_t = add_noise(x0, z, t)
    with torch.no_grad():
        dxdt = cfg.sigma_d * net(x_t / cfg.sigma_d, t, labels, None)
    cs = torch.cos(t) * torch.sin(t)
    x_in, tx, tt = x_t / cfg.sigma_d, cs.reshape(-1, 1, 1, 1) * dxdt, cs * cfg.sigma_d  # rearranged tangents

    def set_attn(impl):
        for m in net.modules():
            if hasattr(m, "attn_impl"):
                m.attn_impl = impl

    with torch.no_grad():
        F_ref, dF_ref = torch.func.jvp(lambda x, s: net(x, s, labels, None), (x_in, t), (tx, tt))
    variants = [("manual fp32 math", None, "math", "manual"), ("manual bf16 math", torch.bfloat16, "math", "manual"),
                ("manual bf16 triton", torch.bfloat16, "triton", "manual"),
                ("func.jvp bf16 math", torch.bfloat16, "math", "func"),
                ("manual fp16 triton", torch.float16, "triton", "manual")]
    if not dry:
        variants.append(("manual fp32 triton", None, "triton", "manual"))
    for name, amp, attn, engine in variants:
        row = {"variant": name}
        if dry and attn == "triton" and amp == torch.bfloat16:
            row["error"] = "skipped: Triton's interpreter has no bf16 tl.dot"
            rows.append(row)
            continue
        try:
            if attn == "triton":
                checks.triton()  # TritonSkipped after a failed canary
            set_attn(attn)
            with torch.no_grad(), torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                if engine == "manual":
                    Fv, dF = net(x_in, t, labels, None, tangents=(tx, tt))
                else:
                    Fv, dF = torch.func.jvp(lambda x, s: net(x, s, labels, None), (x_in, t), (tx, tt))
            row.update(rel_F=rel(Fv.float(), F_ref), rel_dF=rel(dF.float(), dF_ref))
            checks.say(f"network JVP {name:20s}: rel err F {row['rel_F']:.2e}, dF {row['rel_dF']:.2e}")
        except Exception as exc:  # noqa: BLE001
            checks.error(f"network JVP {name}", exc)
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    set_attn("math")
    net = None
    if checks.cuda:
        torch.cuda.empty_cache()
    return rows


# Run order: the training section last (the longest; the budget cuts it first).
SECTIONS = {"hardware": hardware_section, "accuracy": accuracy, "attention": attention, "network": network,
            "training": training}
TRITON_SECTIONS = {"accuracy", "attention", "network", "training"}


def run(checks: GpuChecks, only: set[str] | None = None) -> dict:
    """Every section (or those in only), each wrapped: a failure is recorded and the run goes on."""
    for name, fn in SECTIONS.items():
        if only and name not in only:
            continue
        checks.say(f"=== {name} (budget left {checks.left():.0f} s)")
        try:
            fn(checks)
        except Exception as exc:  # noqa: BLE001
            checks.error(f"section {name}", exc)
        checks.updated()
    fails = [r for r in checks.results["accuracy"] if "pass" in r and not r["pass"]]
    checks.say(f"done in {time.perf_counter() - checks.t0:.0f} s: {len(checks.results['errors'])} errors, "
               f"{len(fails)} accuracy FAILs")
    return checks.results


# ----------------------------------------------------------------------------
# The markdown summary.


def markdown(results: dict) -> str:
    """The results as the markdown section of docs/benchmarks.md."""
    R = results
    dry = R["meta"].get("dry_run")
    hw = R["hardware"]
    lines = ["## GPU", ""]
    lines.append(f"Measured with `bench/gpu_checks.py` ({'DRY RUN on CPU, not real numbers' if dry else 'GPU'}), "
                 f"{R['meta'].get('started')}, {R['meta'].get('elapsed_s')} s in all.")
    lines.append("")
    lines.append(f"- Device: {hw.get('device', 'n/a')}; CUDA {hw.get('cuda', 'n/a')}; driver {hw.get('driver', 'n/a')}")
    lines.append(f"- torch {hw.get('torch', 'n/a')}, triton {hw.get('triton', 'n/a')}, "
                 f"Python {hw.get('python', 'n/a')}")
    if "matmul_bf16_tflops" in hw:
        lines.append(f"- Measured ceilings: bf16 matmul {hw['matmul_bf16_tflops']:.0f} TFLOP/s (8192^3), "
                     f"device copy {hw.get('copy_gbps', float('nan')):.0f} GB/s (read + write)")
    lines.append("- Times: milliseconds, median [min, max] over the stated repeats (CUDA events, after warm-up).")
    lines.append("")

    lines += ["### Fused flash-attention JVP: accuracy", "",
              "Relative error ||x - ref|| / ||ref|| against `attention_math_jvp` in float64 on the same (rounded) "
              "inputs; fresh random inputs per row.", "",
              "| dtype | B | H | N | D | layout | rel err out | rel err t_out | limit | result |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in R["accuracy"]:
        if "skipped" in r:
            lines.append(f"| {r['dtype']} | {r.get('B', '')} | {r.get('H', '')} | {r.get('N', '')} | {r.get('D', '')} "
                         f"| {r.get('layout', '')} | | | | skipped: {r['skipped']} |")
            continue
        lines.append(f"| {r['dtype']} | {r['B']} | {r['H']} | {r['N']} | {r['D']} | {r['layout']} | "
                     f"{r['rel_out']:.2e} | {r['rel_t_out']:.2e} | {r['limit']:.0e} | "
                     f"{'PASS' if r['pass'] else 'FAIL'} |")
    lines.append("")

    lines += ["### Attention timing", "",
              "bf16, B = 4, H = 8, D = 64 (self-attention, N queries and keys). 'fused JVP' returns (out, t_out) "
              "in one launch; SDPA is `F.scaled_dot_product_attention` (forward only, no tangent); math JVP is "
              "`attention_math_jvp` (N x N matrices).", "",
              "| N | Triton fused JVP | Triton forward | SDPA forward | math JVP | fused JVP / SDPA fwd | "
              "fused JVP TFLOP/s | math JVP / fused JVP |",
              "|---|---|---|---|---|---|---|---|"]
    for r in R["attention_timing"]:
        fj, tf, sd, mj = (r.get(k) for k in ("triton_jvp", "triton_fwd", "sdpa_fwd", "math_jvp"))
        ok = lambda t: t and "median_ms" in t
        ratio = f"{fj['median_ms'] / sd['median_ms']:.2f}" if ok(fj) and ok(sd) else "n/a"
        ratio2 = f"{mj['median_ms'] / fj['median_ms']:.2f}" if ok(fj) and ok(mj) else "n/a"
        tflops = f"{r['jvp_flops'] / fj['median_ms'] / 1e9:.1f}" if ok(fj) else "n/a"
        lines.append(f"| {r['N']} | {fmt_ms(fj)} | {fmt_ms(tf)} | {fmt_ms(sd)} | {fmt_ms(mj)} | {ratio} | {tflops} "
                     f"| {ratio2} |")
    lines.append("")
    mem = R["attention_memory"]
    if mem:
        lines += [f"Peak memory above the inputs at N = {mem.get('N')} (bf16, B = 4, H = 8, D = 64), "
                  "`torch.cuda.max_memory_allocated` delta:", "",
                  "| implementation | peak extra MiB |", "|---|---|"]
        for k in ("triton_jvp", "sdpa_fwd", "math_jvp"):
            if k in mem:
                lines.append(f"| {k} | {mem[k]} |")
        if "ratio_fused_over_math" in mem:
            lines.append("")
            lines.append(f"fused / math = {mem['ratio_fused_over_math']:.4f} (target <= 0.25: "
                         f"{'PASS' if mem['ratio_fused_over_math'] <= 0.25 else 'FAIL'})")
        lines.append("")
    if R["kernel_configs"]:
        lines += ["Kernel launch configurations, fused JVP at N = 4096 (bf16, D = 64):", "",
                  "| BLOCK_M | BLOCK_N | warps | stages | ms |", "|---|---|---|---|---|"]
        for r in R["kernel_configs"]:
            c = r["config"]
            lines.append(f"| {c['block_m']} | {c['block_n']} | {c['num_warps']} | {c['num_stages']} | "
                         f"{fmt_ms(r.get('time')) if 'time' in r else r.get('error', '')} |")
        lines.append("")

    tr = R["training_nonfinite"]
    if tr:
        s0 = tr[0]
        lines += ["### sCD training steps: non-finite tangents and losses", "",
                  f"imagenet512 preset, size {s0.get('size')} ({s0.get('params_m', 0):.1f} M parameters), batch "
                  f"{s0.get('batch')}, sCD with CFG teacher (a copy of the student, out_gain = 1 so that F and "
                  "dF are not zero), t from the CM proposal, autocast, GradScaler for fp16, Adam.", "",
                  "| precision | c_noise | JVP rearrangement | attention | steps | non-finite cs_dF elements | "
                  "steps with non-finite cs_dF | non-finite loss steps | scaler skips | max abs cs_dF | step ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in tr:
            if "error" in r:
                lines.append(f"| {r['precision']} | {r.get('c_noise', '')} | {r['rearranged']} | "
                             f"{r.get('attention', '')} | error: {r['error'][:80]} | | | | | | |")
                continue
            lines.append(f"| {r['precision']} | {r['c_noise']} | {r['rearranged']} | {r['attention']} | {r['steps']} | "
                         f"{r['nonfinite_tangent_elems']} | {r['steps_nonfinite_tangent']} | "
                         f"{r['nonfinite_loss_steps']} | "
                         f"{r['scaler_skips']} | {r['max_abs_tangent']:.3g} | {fmt_ms(r['time'])} |")
        lines.append("")
    pr = R["fp16_probe"]
    if pr:
        lines += ["fp16 probe: `scm.losses.jvp_tangent` (manual JVP) at forced t under fp16 autocast vs the "
                  "same call in float32; sCD direction dx/dt = sigma_d F_teacher.", "",
                  "| c_noise | t | rearranged | non-finite cs_dF | max abs cs_dF (fp16 run) | max abs raw dF (fp32) "
                  "| rel err vs fp32 |", "|---|---|---|---|---|---|---|"]
        for r in pr:
            if "error" in r:
                lines.append(f"| {r.get('c_noise')} | {r.get('t')} | {r.get('rearranged')} | error: {r['error'][:80]} "
                             "| | | |")
                continue
            lines.append(f"| {r['c_noise']} | {r['t']:.6g} | {r['rearranged']} | {r['nonfinite']} | "
                         f"{r['max_abs']:.3g} | {r['raw_dF_absmax_fp32']:.3g} | {r['rel_err']:.2e} |")
        lines.append("")
    st = R["step_times"]
    if st:
        lines += ["### Training step time at size S (bf16 autocast)", "",
                  "Interleaved repeats (every method once per round), full step: loss, backward, Adam.", "",
                  "| method | attention | params M | batch | step ms | ratio to teacher |", "|---|---|---|---|---|---|"]
        for r in st:
            lines.append(f"| {r['method']} | {r['attention']} | {r.get('params_m', 0):.1f} | {r.get('batch')} | "
                         f"{fmt_ms(r.get('time')) if 'time' in r else 'error: ' + r.get('error', '')[:60]} | "
                         f"{r.get('ratio_to_teacher', float('nan')):.2f} |")
        lines.append("")
    nj = R["network_jvp"]
    if nj:
        lines += ["### Network JVP agreement (size S)", "",
                  "dF from each variant against `torch.func.jvp` in float32 with math attention (eval mode, "
                  "out_gain = 1).", "",
                  "| variant | rel err F | rel err dF |", "|---|---|---|"]
        for r in nj:
            if "error" in r:
                lines.append(f"| {r['variant']} | error: {r['error'][:80]} | |")
                continue
            lines.append(f"| {r['variant']} | {r['rel_F']:.2e} | {r['rel_dF']:.2e} |")
        lines.append("")
    if R["errors"]:
        lines += ["### Errors", ""] + [f"- {e['where']}: `{e['error'][:300]}`" for e in R["errors"]] + [""]
    return "\n".join(lines)
