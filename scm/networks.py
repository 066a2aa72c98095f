"""EDM2's magnitude-preserving U-Net (Karras et al. 2024) with the sCM changes (Lu & Song 2024).

The network takes x = x_t / sigma_d and TrigFlow time t and returns F_theta (sCM Sec. 3); it applies
c_noise(t) itself, so a JVP w.r.t. t includes d c_noise / dt.

Every layer maps a pair (y, ty): a value and, optionally, its tangent. forward() runs the pairs with
ty = None (plain autograd, also under torch.func.jvp); forward_with_tangent() propagates tangents by
hand (sCD's cheap JVP): linear layers apply the same weights to the tangent, nonlinearities and
normalizations use their analytic derivatives, attention uses attention_jvp. Tangents are computed
without an autograd graph (stop-gradient, like dF-/dt in Algorithm 1), so only F carries a graph.
Both paths run the same code in the same order, so dropout masks drawn from the same RNG state agree.

Deviations from EDM2 / the sCM paper (each needed for the switches or the parameter budget):
- AdaGN (sCM §4.1): y = norm(y) * S + B after conv_res0, with a scale and a shift linear per block. The
  shift linears add 4.9 % to EDM2's parameter counts (S..XXL; +0.05 % more with the guidance input).
- "double" AdaGN has no emb_gain: pnorm makes the scale of s(t) and b(t) irrelevant, a zero-initialized
  gain would only zero S (the block's output) at init.
- The guidance-scale embedding is added with a zero-initialized gain, so a CM with the guidance input
  computes its teacher's function at initialization (the CM starts from the teacher's weights, §5).
- Attention blocks have at least one head (EDM2: out_channels // 64 heads, i.e. none in narrow nets).
- The positional time embedding is scaled by sqrt(2) like EDM2's Fourier features (unit RMS per channel).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from scm.attention import attention, attention_jvp, resolve_attention, triton_installed
from scm.config import PRESETS, SIZES, DataConfig, NetworkConfig, resolve

log = logging.getLogger(__name__)

C_NOISE_EPS = 1e-4  # log_sigma: t is clamped to [eps, pi/2 - eps], so sigma_d tan t stays in (5e-5, 5e3)

# ----------------------------------------------------------------------------
# Magnitude-preserving primitives (EDM2 Sec. 3). A tangent argument of None means "value only".


def normalize(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Unit RMS over all but the first dim (EDM2 weight normalization): x / (eps + ||x|| / sqrt(n))."""
    norm = torch.linalg.vector_norm(x, dim=list(range(1, x.ndim)), keepdim=True)
    return x / (eps + norm * math.sqrt(norm.numel() / x.numel()))


def normalize_(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """normalize(x) written into x (the same operations in the same order, without a temporary)."""
    norm = torch.linalg.vector_norm(x, dim=list(range(1, x.ndim)), keepdim=True)
    return x.div_(norm.mul_(math.sqrt(norm.numel() / x.numel())).add_(eps))


def pixel_norm(x, tx, dim: int = 1, eps: float = 1e-4):
    """EDM2's normalize over one dim; JVP: (tx - y dr) / n with r = ||x|| / sqrt(size), dr = <x, tx> / (size r)."""
    size = x.shape[dim]
    r = torch.linalg.vector_norm(x, dim=dim, keepdim=True) / math.sqrt(size)
    y = x / (r + eps)
    if tx is None:
        return y, None
    with torch.no_grad():
        dr = (x * tx).sum(dim, keepdim=True) / (size * r.clamp_min(torch.finfo(r.dtype).tiny))
        return y, (tx - y * dr) / (r + eps)


def group_norm(x, tx, groups: int, eps: float = 1e-5):
    """Group norm without affine parameters; JVP: (tx - mean(tx) - y mean(y tx)) / sigma per group."""
    if tx is None:
        return F.group_norm(x, groups, eps=eps), None
    B, C = x.shape[:2]
    if torch.is_autocast_enabled(x.device.type):  # autocast runs group_norm in float32: keep its dispatch
        y = F.group_norm(x, groups, eps=eps)
        with torch.no_grad():
            rstd = (x.reshape(B, groups, -1).var(-1, unbiased=False) + eps).rsqrt()
    else:  # the forward's 1 / sigma per group (rstd) serves the tangent: no second pass over x
        y, _, rstd = torch.ops.aten.native_group_norm(x, None, None, B, C, x[0, 0].numel(), groups, eps)
    with torch.no_grad():
        yg, tg = y.reshape(B, groups, -1), tx.reshape(B, groups, -1)
        ty = (tg - tg.mean(-1, keepdim=True) - yg * (yg * tg).mean(-1, keepdim=True)) * rstd[..., None]
        return y, ty.reshape(x.shape)


def mp_silu(x, tx):
    """SiLU / 0.596 keeps unit magnitude (EDM2); silu'(x) = s (1 + x (1 - s)) with s = sigmoid(x)."""
    y = F.silu(x) / 0.596
    if tx is None:
        return y, None
    with torch.no_grad():
        if tx.dtype == x.dtype:  # aten's silu_backward computes tx * silu'(x) in one kernel
            return y, torch.ops.aten.silu_backward(tx, x) / 0.596
        s = torch.sigmoid(x)
        return y, tx * (s * (1 + x * (1 - s)) / 0.596)


def mp_sum(a, b, t: float = 0.5):
    """Magnitude-preserving interpolation (EDM2): lerp(a, b, t) / sqrt((1 - t)^2 + t^2)."""
    dtype = torch.promote_types(a.dtype, b.dtype)  # autocast mixes bf16/fp16 branches with fp32 skips
    return a.to(dtype).lerp(b.to(dtype), t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, t: float = 0.5):
    """Magnitude-preserving channel concatenation with balance t (EDM2's skip connections)."""
    Na, Nb = a.shape[1], b.shape[1]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (C / math.sqrt(Na) * (1 - t)), b * (C / math.sqrt(Nb) * t)], dim=1)


def resample(x, mode: str):
    """EDM2's [1, 1] resampling filter: 2x2 average pooling down, nearest-neighbour up."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


def tangent(fn, *tangents, **kwargs):
    """A linear, parameter-free map applied to tangents (None when tangents are not tracked)."""
    if tangents[0] is None:
        return None
    with torch.no_grad():
        return fn(*tangents, **kwargs)


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is <= at_most (at least 1): group and head counts that divide C."""
    return max(d for d in range(1, max(at_most, 1) + 1) if n % d == 0)


# ----------------------------------------------------------------------------
# Layers with tangents.


class MPConv(nn.Module):
    """EDM2 magnitude-preserving convolution (kernel k x k) or linear layer (kernel None); no bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *([kernel] * 2 if kernel else [])))
        self._unit = None  # (weight, its version and storage, normalize(weight)): see _normalized

    def _normalized(self) -> torch.Tensor:
        """normalize(weight), computed once while the weight is unchanged when no graph is needed (eval and
        no_grad: the sCD teacher, sampling); keyed on the tensor, its in-place version and its storage. CPU
        only: the per-op overhead it saves matters there, while on a GPU a second copy of an XXL teacher's
        weights (6 GB) would not pay for itself."""
        w = self.weight
        if (self.training or torch.is_grad_enabled() or w.device.type != "cpu"
                or torch._C._are_functorch_transforms_active()):
            self._unit = None
            return normalize(w)
        key = (w._version, w.data_ptr(), w.dtype)
        if self._unit is None or self._unit[0] is not w or self._unit[1] != key:
            self._unit = (w, key, normalize(w))
        return self._unit[2]

    def _op(self, x, w):
        return x @ w.t() if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)

    def forward(self, x, tx=None, gain=1.0):
        # Forced weight normalization (EDM2 Sec. 3.2): in training mode the stored weight is projected back to
        # unit norm. Written through .data (no version bump): a second call within one optimizer step changes
        # the weight only at rounding level (normalize contracts to its fixed point by a factor eps per call),
        # and a bump would make autograd reject an earlier call's graph (sCD/sCT may call the net twice per
        # step). Skipped inside torch.func transforms (they forbid mutating captured tensors); F is unaffected.
        if self.training and not torch._C._are_functorch_transforms_active():
            with torch.no_grad():
                normalize_(self.weight.data)
        # Unit-norm filters scaled by 1/sqrt(fan_in): magnitude-preserving for unit-variance inputs.
        w = (self._normalized() * (gain / math.sqrt(self.weight[0].numel()))).to(x.dtype)
        y = self._op(x, w)
        if tx is None:
            return y, None
        # Linear (no bias): the tangent is the same op. A separate no-grad call keeps it out of the graph;
        # it measured faster on the CPU than one call on torch.cat([x, tx]) (the copy costs more), and a
        # shared call with a graph would make backward process the tangent half too.
        with torch.no_grad():
            return y, self._op(tx, w)


class TimeFeatures(nn.Module):
    """sqrt(2) cos(c f + phase): unit-RMS features of a per-sample scalar c.

    positional (sCM): f_i = scale 10000^(-i/half), phases 0 and -pi/2, i.e. [cos(c f_i), sin(c f_i)].
    fourier (EDM2's MPFourier): f = 2 pi scale N(0, 1), phase = 2 pi U(0, 1), from a fixed generator seed.
    """

    def __init__(self, kind: str, channels: int, scale: float, seed: int = 0):
        super().__init__()
        if kind == "positional":
            half = channels // 2
            f = scale * 10000.0 ** (-torch.arange(half, dtype=torch.float64, device="cpu") / half)
            freqs, phases = torch.cat([f, f]), torch.cat([torch.zeros(half, device="cpu"),
                                                          torch.full((half,), -math.pi / 2, device="cpu")])
        elif kind == "fourier":
            g = torch.Generator(device="cpu").manual_seed(seed)  # deterministic across processes
            freqs = 2 * math.pi * scale * torch.randn(channels, generator=g, device="cpu")
            phases = 2 * math.pi * torch.rand(channels, generator=g, device="cpu")
        else:
            raise ValueError(f"network.time_embedding: unknown kind {kind!r}; choose positional or fourier")
        self.register_buffer("freqs", freqs.float())
        self.register_buffer("phases", phases.float())
        self.channels = freqs.numel()

    def forward(self, c, tc):
        arg = c[:, None] * self.freqs + self.phases
        y = torch.cos(arg) * math.sqrt(2)
        if tc is None:
            return y, None
        with torch.no_grad():
            return y, -torch.sin(arg) * (math.sqrt(2) * self.freqs) * tc[:, None]


class Block(nn.Module):
    """EDM2 U-Net block: resample, (enc) skip conv + pixel norm, residual branch, self-attention, clipping."""

    def __init__(self, in_channels, out_channels, emb_channels, flavor, cfg: NetworkConfig,
                 modulation: str, resample_mode="keep", attention=False):
        super().__init__()
        self.flavor, self.resample_mode, self.modulation = flavor, resample_mode, modulation
        self.dropout, self.attn_impl, self.attn_block_size = cfg.dropout, cfg.attention, cfg.attn_block_size
        self.res_balance, self.attn_balance, self.clip_act = 0.3, 0.3, 256.0  # EDM2's defaults
        # AdaGN's group norm: 32 groups as usual, but at least 4 channels per group (largest divisor of C).
        self.groups = largest_divisor(out_channels, min(32, out_channels // 4))
        heads = largest_divisor(out_channels, out_channels // cfg.channels_per_head)
        self.num_heads = heads if attention else 0
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, 3)
        self.emb_linear = MPConv(emb_channels, out_channels)  # scale s(t) (EDM2's emb_linear)
        self.emb_linear_shift = MPConv(emb_channels, out_channels) if modulation != "edm2" else None  # b(t)
        self.emb_gain = nn.Parameter(torch.zeros([])) if modulation != "double" else None
        self.shift_gain = nn.Parameter(torch.zeros([])) if modulation == "plain" else None
        self.conv_res1 = MPConv(out_channels, out_channels, 3)
        self.conv_skip = MPConv(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, 1) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, 1) if self.num_heads else None

    def _modulate(self, y, ty, emb):
        """EDM2: y (1 + s). sCM AdaGN: norm(y) S + B; double: S = pnorm(s), B = pnorm(b); plain: 1 + s, b."""
        e, te = emb
        if self.modulation != "edm2":
            y, ty = group_norm(y, ty, self.groups)
        if self.modulation == "double":
            S, tS = pixel_norm(*self.emb_linear(e, te))
            B, tB = pixel_norm(*self.emb_linear_shift(e, te))
        else:
            s, tS = self.emb_linear(e, te, gain=self.emb_gain)
            S = 1 + s
            B, tB = self.emb_linear_shift(e, te, gain=self.shift_gain) if self.modulation == "plain" else (0, 0)
        per_channel = lambda z: z[:, :, None, None] if torch.is_tensor(z) else z
        if not torch.is_tensor(B):  # edm2: no shift
            out = y * per_channel(S)
            if ty is None:
                return out, None
            with torch.no_grad():  # product rule: d(y S) = ty S + y dS
                return out, torch.addcmul(ty * per_channel(S), y, per_channel(tS))
        out = torch.addcmul(per_channel(B), y, per_channel(S))  # y S + B in one kernel
        if ty is None:
            return out, None
        with torch.no_grad():  # product rule: d(y S + B) = ty S + y dS + dB
            return out, torch.addcmul(torch.addcmul(per_channel(tB), y, per_channel(tS)), ty, per_channel(S))

    def _attention(self, x, tx):
        """Self-attention with pixel-normalized q, k, v per head (EDM2); tangents through attention_jvp."""
        B, C, H, W = x.shape
        y, ty = self.attn_qkv(x, tx)
        split = lambda z: z.reshape(B, self.num_heads, C // self.num_heads, 3, H * W)
        y, ty = pixel_norm(split(y), tangent(split, ty), dim=2)
        q, k, v = (z.transpose(-1, -2) for z in y.unbind(3))  # (B, heads, N, channels per head)
        if ty is None:
            o, to = attention(q, k, v, impl=self.attn_impl, block_size=self.attn_block_size), None
        else:
            tq, tk, tv = (z.transpose(-1, -2) for z in ty.unbind(3))
            o, to = attention_jvp(q, k, v, tq, tk, tv, impl=self.attn_impl, block_size=self.attn_block_size)
        merge = lambda z: z.transpose(-1, -2).reshape(B, C, H, W)
        return self.attn_proj(merge(o), tangent(merge, to))

    def forward(self, x, tx, emb):
        # Main branch: resampling; the encoder also changes width and pixel-normalizes (EDM2 Fig. 21).
        x, tx = resample(x, self.resample_mode), tangent(resample, tx, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x, tx = self.conv_skip(x, tx)
            x, tx = pixel_norm(x, tx)

        # Residual branch: conv, time/label modulation (AdaGN), dropout (one mask for value and tangent), conv.
        y, ty = self.conv_res0(*mp_silu(x, tx))
        y, ty = mp_silu(*self._modulate(y, ty, emb))
        if self.training and self.dropout > 0:
            keep = (torch.rand(y.shape, device=y.device) >= self.dropout).to(y.dtype) / (1 - self.dropout)
            y, ty = y * keep, tangent(torch.mul, ty, keep)
        y, ty = self.conv_res1(y, ty)

        # Connect the branches with a magnitude-preserving sum (res_balance 0.3).
        if self.flavor == "dec" and self.conv_skip is not None:
            x, tx = self.conv_skip(x, tx)
        x, tx = mp_sum(x, y, self.res_balance), tangent(mp_sum, tx, ty, t=self.res_balance)

        if self.num_heads:  # self-attention, mixed in with attn_balance 0.3
            y, ty = self._attention(x, tx)
            x, tx = mp_sum(x, y, self.attn_balance), tangent(mp_sum, tx, ty, t=self.attn_balance)

        # Clip activations (EDM2: guards against rare fp16 overflow); the tangent is zero where clipped. On the
        # CPU, when no activation exceeds the bound, clamp is the identity (gradient 1, tangent unchanged) and is
        # skipped, with its backward and the tangent's mask (a GPU would have to synchronize for the check).
        if (x.device.type == "cpu" and not torch._C._are_functorch_transforms_active()
                and not torch.compiler.is_compiling()):  # a compiled graph fuses the clamp instead
            lo, hi = torch.aminmax(x.detach())
            if -self.clip_act <= lo.item() and hi.item() <= self.clip_act:
                return x, tx
        tx = tangent(lambda z: z * (x.abs() <= self.clip_act), tx)
        return x.clamp(-self.clip_act, self.clip_act), tx


# ----------------------------------------------------------------------------
# The U-Net.


class SCMUNet(nn.Module):
    """F_theta(x_t / sigma_d, t): EDM2's U-Net with the sCM switches of NetworkConfig (sCM Sec. 4.1).

    modulation: NetworkConfig.adagn ("double" | "plain"), or "edm2" (EDM2's scale-only modulation without
    group norm; used to check the parameter counts against EDM2's).
    """

    def __init__(self, cfg: NetworkConfig, img_resolution: int, img_channels: int, label_dim: int,
                 sigma_d: float, modulation: str | None = None):
        super().__init__()
        self.cfg, self.sigma_d = cfg, float(sigma_d)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.modulation = modulation or cfg.adagn
        if self.modulation not in ("double", "plain", "edm2"):
            raise ValueError(f"network.adagn: unknown {self.modulation!r}; choose double or plain")
        cblock = [cfg.model_channels * m for m in cfg.channel_mult]
        cnoise, cemb = cblock[0], cfg.model_channels * cfg.channel_mult_emb
        block = dict(emb_channels=cemb, cfg=cfg, modulation=self.modulation)
        self.out_gain = nn.Parameter(torch.zeros([]))  # zero-initialized: F = 0 at init (EDM2)

        # Embedding of c_noise(t), the label and the guidance scale (EDM2 + sCM §5).
        self.emb_time = TimeFeatures(cfg.time_embedding, cnoise, cfg.time_embedding_scale, seed=0)
        self.emb_noise = MPConv(self.emb_time.channels, cemb)
        self.emb_label = MPConv(label_dim, cemb) if label_dim else None
        self.emb_guidance_features = TimeFeatures("positional", cnoise, 1.0) if cfg.guidance_input else None
        self.emb_guidance = MPConv(self.emb_guidance_features.channels, cemb) if cfg.guidance_input else None
        self.guidance_gain = nn.Parameter(torch.zeros([])) if cfg.guidance_input else None

        # Adaptive weighting head w_phi(t): EDM2's logvar head on c_noise(t).
        self.logvar_fourier = TimeFeatures("fourier", cfg.logvar_channels, 1.0, seed=1)
        self.logvar_linear = MPConv(self.logvar_fourier.channels, 1)

        # Encoder: a conv on [x, 1], then per level (down block +) num_blocks blocks (EDM2).
        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # the constant-one channel lets the first conv see the image border
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, flavor="enc", resample_mode="down", **block)
            for idx in range(cfg.num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, flavor="enc",
                                                            attention=res in cfg.attn_resolutions, **block)

        # Decoder: two blocks at the bottom (the first with attention), then per level (up block +)
        # num_blocks + 1 blocks, each taking a skip connection (EDM2).
        self.dec = nn.ModuleDict()
        skips = [m.weight.shape[0] if isinstance(m, MPConv) else m.conv_res1.weight.shape[0]
                 for m in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, flavor="dec", attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, flavor="dec", **block)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, flavor="dec", resample_mode="up", **block)
            for idx in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, flavor="dec",
                                                            attention=res in cfg.attn_resolutions, **block)
        self.out_conv = MPConv(cout, img_channels, 3)

    # ------------------------------------------------------------------------

    def c_noise(self, t, tt=None):
        """c_noise(t) and its tangent (dc/dt) tt. sCM: c = t; EDM: log(sigma_d tan t); or 1000 t."""
        if self.cfg.c_noise == "t":
            return t, tt
        if self.cfg.c_noise == "1000t":
            return 1000 * t, tangent(torch.mul, tt, 1000)
        tc = t.clamp(C_NOISE_EPS, math.pi / 2 - C_NOISE_EPS)  # keeps log(tan t) finite
        c = torch.log(self.sigma_d * torch.tan(tc))
        if tt is None:
            return c, None
        with torch.no_grad():  # d log(tan t) / dt = 1 / (sin t cos t); zero where clamped
            inside = (t >= C_NOISE_EPS) & (t <= math.pi / 2 - C_NOISE_EPS)
            return c, tt * inside / (torch.sin(tc) * torch.cos(tc))

    def _embedding(self, t, tt, labels, guidance):
        """emb = mp_silu(mp_sum(noise emb [+ guidance emb], label emb)); its tangent depends on t only."""
        B = t.shape[0]
        e, te = self.emb_noise(*self.emb_time(*self.c_noise(t, tt)))
        if self.emb_guidance is not None:  # guidance scale s (sCM §5); None means s = 1 (no guidance)
            s = torch.ones_like(t) if guidance is None else guidance.to(t.dtype).reshape(-1).expand(B)
            g, _ = self.emb_guidance(self.emb_guidance_features(s, None)[0], None, gain=self.guidance_gain)
            e = e + g  # s is a constant for d/dt: the tangent is unchanged
        if self.emb_label is not None:  # one-hot * sqrt(label_dim) (unit RMS); None = zero vector
            y = torch.zeros(B, self.label_dim, dtype=e.dtype, device=e.device)
            if labels is not None:
                y = F.one_hot(labels.reshape(-1).long(), self.label_dim).to(e.dtype) * math.sqrt(self.label_dim)
                if self.training and self.cfg.label_dropout > 0:  # per-sample label dropout (for CFG)
                    y = y * (torch.rand(B, 1, device=e.device) >= self.cfg.label_dropout).to(e.dtype)
            e = mp_sum(e, self.emb_label(y)[0], t=0.5)
            te = tangent(lambda z: mp_sum(z, torch.zeros_like(z), t=0.5), te)
        return mp_silu(e, te)

    def _run(self, x, t, tx, tt, labels, guidance):
        """The U-Net on pairs (value, tangent); tx = tt = None computes the value only."""
        B = x.shape[0]
        t = t.to(x.dtype).reshape(-1).expand(B)
        tt = None if tt is None else tt.to(x.dtype).reshape(-1).expand(B)
        emb = self._embedding(t, tt, labels, guidance)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # constant-one input channel (EDM2)
        tx = tangent(lambda z: torch.cat([z, torch.zeros_like(z[:, :1])], dim=1), tx)
        skips = []
        for name, block in self.enc.items():
            x, tx = block(x, tx) if name.endswith("_conv") else block(x, tx, emb)
            skips.append((x, tx))
        for name, block in self.dec.items():
            if "block" in name:  # skip connections: magnitude-preserving concatenation (EDM2)
                s, ts = skips.pop()
                x, tx = mp_cat(x, s), tangent(mp_cat, tx, ts)
            x, tx = block(x, tx, emb)
        return self.out_conv(x, tx, gain=self.out_gain)

    def forward(self, x, t, labels=None, guidance=None, tangents=None):
        """F_theta(x, t) for x = x_t / sigma_d (B, C, H, W) and TrigFlow time t (B,).

        With tangents=(tx, tt) returns forward_with_tangent's (F, tF): through forward(), wrappers such
        as DistributedDataParallel see the call and synchronize gradients.
        """
        if tangents is not None:
            return self.forward_with_tangent(x, t, *tangents, labels, guidance)
        return self._run(x, t, None, None, labels, guidance)[0]

    def forward_with_tangent(self, x, t, tx, tt, labels=None, guidance=None):
        """(F, tF): F as forward() (with its graph), tF = dF[x, t](tx, tt) by hand, without a graph."""
        return self._run(x, t, tx.detach(), tt.detach(), labels, guidance)

    def w_phi(self, t):
        """Adaptive weighting w_phi(t) (B,): Fourier features of c_noise(t) and a linear layer (EDM2 logvar)."""
        w = self.logvar_linear.weight
        c, _ = self.c_noise(t.to(w.dtype).reshape(-1))
        return self.logvar_linear(self.logvar_fourier(c, None)[0])[0].reshape(-1)


# ----------------------------------------------------------------------------
# Construction and parameter counts.


_LOGGED_ATTENTION: set = set()


def build_network(net_cfg: NetworkConfig, data_cfg: DataConfig, sigma_d: float, device=None) -> SCMUNet:
    """The U-Net for a dataset: resolution, channels and label_dim come from data_cfg.

    device: where it will run (None: CUDA if available, else the CPU), for the log line of attention=auto.
    """
    net = SCMUNet(net_cfg, data_cfg.resolution, data_cfg.channels, data_cfg.label_dim, sigma_d)
    log.debug("SCMUNet for %s: %d channels, %.3f M parameters", data_cfg.name, net_cfg.model_channels,
              sum(p.numel() for p in net.parameters()) / 1e6)
    # attention=auto resolves per call (device and dtype of q); say once per process what it picks here.
    if net_cfg.attention == "auto":
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                           else "cpu")
        impl = resolve_attention("auto", dev.type, torch.float32, triton_installed())
        if (dev.type, impl) not in _LOGGED_ATTENTION:
            _LOGGED_ATTENTION.add((dev.type, impl))
            log.info("network.attention=auto: %s attention on %s", impl, dev.type)
    return net


def count_parameters(net_cfg: NetworkConfig, data_cfg: DataConfig, sigma_d: float = 0.5,
                     modulation: str | None = None) -> int:
    """Number of parameters, counted on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        net = SCMUNet(net_cfg, data_cfg.resolution, data_cfg.channels, data_cfg.label_dim, sigma_d, modulation)
    return sum(p.numel() for p in net.parameters())


def size_table(dataset: str) -> list[dict]:
    """Rows {size, channels, params_m} for every size with a preset for `dataset` (teacher configs)."""
    rows = []
    for size in SIZES:
        if (dataset, size) in PRESETS:
            cfg = resolve(dataset, size, "teacher")
            n = count_parameters(cfg.network, cfg.data, cfg.sigma_d)
            rows.append({"size": size, "channels": cfg.network.model_channels, "params_m": round(n / 1e6, 3)})
    return rows
