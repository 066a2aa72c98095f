"""Configuration: dataclasses, the preset table, strict dotted overrides.

One source of truth for every hyperparameter: the field defaults below plus PRESETS (the paper's settings, App. G).
Ablations, sweeps and the CLI only override fields by dotted key (`loss.tangent_norm=clip`).
Each field carries metadata: `help` (documentation: `scm config fields` lists every field), and
optionally `choices`, `min`, `max`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and what is allowed.

    `key` is the dotted key at fault when there is one (the CLI uses it to name the file or --set it came from).
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def load_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: {}); errors name `what` (e.g. '--config') and the
    file, with the line of a syntax error."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what}: {path} not found")
    if path.is_dir():
        raise ConfigError(f"{what}: {path} is a directory, expected a YAML file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{what}: {path}: YAML syntax error{at}: {' '.join(problem.split())}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: {path}: the top level must be a mapping (key: value lines), "
                          f"got a {type(raw).__name__}: {str(raw)[:60]!r}")
    return raw


def opt(default, help: str, choices=None, min=None, max=None):
    """A dataclass field with documentation and validation metadata."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Default locations (a study's own `results` folder overrides the first part).
REF_STATS_DIR = "results/cache/ref-stats"  # reference statistics and features of real data, per extractor

# ----------------------------------------------------------------------------
# The sections of a run configuration.


@dataclass
class DataConfig:
    name: str = opt("shapes", "Dataset: the embedded 'shapes' set, 'gmm', 'cifar10', 'imagenet64', "
                    "'imagenet512' (EDM2 ZIPs), or your own EDM2 ZIP ('zip').",
                    choices=["shapes", "gmm", "cifar10", "imagenet64", "imagenet512", "zip"])
    path: str = opt("", "Dataset location (ZIP file or folder) for real datasets; empty for embedded ones.")
    resolution: int = opt(16, "Image side length in pixels (latent side length for latents; 1 = a vector).", min=1)
    channels: int = opt(3, "Channels of the data (3 for RGB, 4 for SD-VAE latents).", min=1)
    label_dim: int = opt(8, "Number of classes; 0 = unconditional.", min=0)
    num_images: int = opt(2048, "Size of the embedded dataset (shapes/gmm).", min=1)
    gmm_components: int = opt(8, "gmm: number of mixture components K (unequal weights and widths).", min=1)
    gmm_seed: int = opt(0, "gmm: seed of the mixture's parameters (means, widths, weights).", min=0)
    gmm_mean_resolution: int = opt(0, "gmm: each component mean is an image drawn at this side length and "
                                      "upsampled by repetition (1 = flat-colour means); 0 = independent pixels.",
                                   min=0)
    shapes_version: int = opt(1, "Version of the embedded shapes renderer (scm.shapes.SHAPES_VERSIONS).", min=1)
    latent_mean: list = opt([], "Per-channel mean of latents (imagenet512: [1.56, -0.695, 0.483, 0.729]).")
    latent_std: list = opt([], "Per-channel std of latents (imagenet512: [5.27, 5.91, 4.21, 4.31]).")
    xflip: bool = opt(False, "Augment with horizontal flips.")


@dataclass
class NetworkConfig:
    model_channels: int = opt(12, "Base width of the U-Net (EDM2 S/M/L/XL/XXL = 192/256/320/384/448).", min=1)
    channel_mult: list = opt([1, 2, 3, 4], "Width multiplier per resolution level (EDM2: [1, 2, 3, 4]).")
    channel_mult_emb: int = opt(4, "Embedding width = model_channels x this.", min=1)
    num_blocks: int = opt(3, "Residual blocks per resolution level (EDM2: 3).", min=1)
    attn_resolutions: list = opt([16, 8], "Resolutions with self-attention (EDM2: [16, 8]).")
    channels_per_head: int = opt(64, "Channels per attention head.", min=1)
    dropout: float = opt(0.0, "Dropout probability in residual blocks.", min=0.0, max=1.0)
    label_dropout: float = opt(0.0, "Probability of dropping the class label (for CFG teachers: 0.1).",
                               min=0.0, max=1.0)
    time_embedding: str = opt("positional", "Time embedding: sinusoidal positional (sCM) or random "
                                            "fourier features (EDM).",
                              choices=["positional", "fourier"])
    time_embedding_scale: float = opt(1.0, "Frequency scale of the time embedding (Fourier: 16 in EDM/NCSN++; "
                                           "sCM needs a small one).", min=0.0)
    c_noise: str = opt("t", "Time conditioning c_noise(t): t (sCM), log_sigma = log(sigma_d tan t) (EDM), 1000t.",
                       choices=["t", "log_sigma", "1000t"])
    adagn: str = opt("double", "Adaptive group norm: double (pixel-normed scale and shift, sCM) or plain.",
                     choices=["double", "plain"])
    guidance_input: bool = opt(False, "Add a guidance-scale input (CFG distillation).")
    attention: str = opt("math", "Attention implementation: math (N x N), blockwise (online softmax, O(N) JVP, "
                                 "pure PyTorch), triton (the fused flash-attention + JVP kernel; CUDA), or auto "
                                 "(triton on CUDA where it applies, blockwise elsewhere; logged at network build).",
                         choices=["math", "blockwise", "triton", "auto"])
    attn_block_size: int = opt(64, "Key/query block size of blockwise attention.", min=1)
    logvar_channels: int = opt(128, "Width of the Fourier features of the adaptive-weighting head w_phi(t).", min=1)


@dataclass
class LossConfig:
    P_mean: float = opt(-1.0, "Mean of log(sigma) of the time proposal: t = arctan(exp(tau) / sigma_d).")
    P_std: float = opt(1.4, "Std of log(sigma) of the time proposal.", min=0.0)
    tangent_warmup: bool = opt(True, "Tangent warmup: r = min(1, step / warmup_iters) on the second term of g.")
    warmup_iters: int = opt(10000, "Tangent warmup length H in iterations.", min=0)
    tangent_norm: str = opt("l2", "Tangent normalization: g / (||g|| + c) with plain L2 over all non-batch dims "
                                  "(l2), or RMS = L2/sqrt(D) (rms); clip g to [-1, 1] (clip); none.",
                            choices=["l2", "rms", "clip", "none"])
    tangent_norm_c: float = opt(0.1, "The constant c of tangent normalization.", min=0.0)
    adaptive_weighting: bool = opt(True, "Learned adaptive weighting w_phi(t); off means w = 0.")
    jvp_rearrangement: bool = opt(True, "JVP with tangents (cos t sin t dx/dt, cos t sin t sigma_d) (FP16-safe).")
    jvp_impl: str = opt("manual", "JVP engine: hand-propagated tangents sharing the primal (manual), torch.func.jvp "
                                  "(func), or a central difference of F- in float64 along the same tangents "
                                  "(finite_difference: any attention kernel, no forward-mode AD needed).",
                        choices=["manual", "func", "finite_difference"])
    jvp_fd_step: float = opt(1e-5, "finite_difference: step h, the RMS of the input perturbation per sample; "
                                   "error ~ h^2 down to float64 round-off ~ 1e-16 / h, so h ~ cbrt(1e-16).",
                             min=1e-12, max=1.0)
    time: str = opt("continuous", "continuous: the exact tangent (JVP); discrete: a finite "
                                  "difference over N time steps.",
                    choices=["continuous", "discrete"])
    discrete_steps: int = opt(1024, "N of the discrete-time variant: step dt = (pi/2) / N.", min=1)
    guidance_min: float = opt(1.0, "sCD with CFG: guidance scale s ~ U[guidance_min, guidance_max].", min=0.0)
    guidance_max: float = opt(1.0, "Upper end of the sampled guidance scale (1.0 = no guidance).", min=0.0)


@dataclass
class OptimConfig:
    name: str = opt("adam", "Optimizer: adam or radam (the paper's CIFAR-10 CMs).", choices=["adam", "radam"])
    lr: float = opt(1e-2, "Peak learning rate.", min=0.0)
    beta1: float = opt(0.9, "Adam beta1.", min=0.0, max=1.0)
    beta2: float = opt(0.99, "Adam beta2.", min=0.0, max=1.0)
    eps: float = opt(1e-8, "Adam epsilon.", min=0.0)
    lr_ref_iters: int = opt(0, "EDM2 inverse-sqrt decay: lr / sqrt(max(step / t_ref, 1)); 0 = constant.", min=0)
    lr_rampup_kimg: float = opt(0.0, "Linear learning-rate ramp-up in kimg.", min=0.0)
    grad_clip: float = opt(0.0, "Clip the global gradient norm to this value; 0 = off.", min=0.0)


@dataclass
class EMAConfig:
    kind: str = opt("power", "EMA: EDM2 power function (sigma_rel), halflife (in kimg), or none.",
                    choices=["power", "halflife", "none"])
    sigma_rel: float = opt(0.05, "Relative std of the power-function EMA profile (EDM2).", min=0.0, max=0.28)
    halflife_kimg: float = opt(500.0, "EMA half-life in thousands of images.", min=0.0)
    rampup: float = opt(0.05, "Half-life EMA: cap the half-life at rampup x images seen; 0 = off.", min=0.0)


@dataclass
class SamplerConfig:
    sigma_max: float = opt(80.0, "Starting noise level: t_max = arctan(sigma_max / sigma_d).", min=0.0)
    t_mid: float = opt(1.1, "Intermediate time of 2-step consistency sampling (TrigFlow units).",
                       min=0.0, max=math.pi / 2)
    teacher_solver: str = opt("dpm2s", "Teacher PF-ODE solver: euler, heun, or dpm2s "
                                                  "(DPM-Solver-2S, the paper's).", choices=["euler", "heun", "dpm2s"])
    teacher_steps: int = opt(32, "Teacher solver steps (DPM-Solver-2S: NFE = 2 x steps - 1).", min=1)
    guidance: float = opt(1.0, "Classifier-free guidance scale at sampling (1.0 = none).", min=0.0)


@dataclass
class RunConfig:
    method: str = opt("teacher", "What to train: the TrigFlow teacher, sct (from scratch) or scd (distillation).",
                      choices=["teacher", "sct", "scd"])
    size: str = opt("tS", "Model size: a key of scm.config.SIZES.")
    seed: int = opt(0, "Random seed.", min=0)
    batch_size: int = opt(64, "Global batch size.", min=1)
    total_kimg: float = opt(64.0, "Training length in thousands of images.", min=0.0)
    precision: str = opt("fp32", "Autocast precision: fp32, bf16 or fp16.", choices=["fp32", "bf16", "fp16"])
    device: str = opt("auto", "Device: auto, cpu, cuda.", choices=["auto", "cpu", "cuda"])
    threads: int = opt(0, "CPU threads for torch (0 = torch's default; 1 when several runs share a machine).",
                       min=0)
    teacher_run_dir: str = opt("", "sCD: run directory of the finished teacher.")
    checkpoint_kimg: float = opt(16.0, "Checkpoint every this many kimg.", min=0.0)
    keep_checkpoints: int = opt(2, "Keep the last K checkpoints.", min=1)
    log_kimg: float = opt(1.0, "Write a stats line every this many kimg.", min=0.0)
    max_bad_batches: int = opt(0, "Skip up to this many NaN/Inf batches before failing.", min=0)
    eval_kimg: float = opt(0.0, "Report FID during training every this many kimg (sweeps); 0 = off.", min=0.0)
    tracker: str = opt("none", "Mirror stats.jsonl and sample grids to none, tensorboard (RUN_DIR/tensorboard) or "
                       "wandb (offline without network); scm.tracking.", choices=["none", "tensorboard", "wandb"])
    tracker_project: str = opt("scm-bench", "Weights & Biases project of run.tracker=wandb.")


@dataclass
class Config:
    sigma_d: float = opt(0.5, "Data standard deviation sigma_d (TrigFlow).", min=0.0)
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Dataset."})
    network: NetworkConfig = field(default_factory=NetworkConfig, metadata={"help": "U-Net."})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "Training objective."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer and schedule."})
    ema: EMAConfig = field(default_factory=EMAConfig, metadata={"help": "Exponential moving average."})
    sampler: SamplerConfig = field(default_factory=SamplerConfig, metadata={"help": "Sampling."})
    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "Run settings."})


# ----------------------------------------------------------------------------
# Model sizes: EDM2's ladder (Karras et al. 2024, Table 2) and a CPU ladder of the same shape (1/16 of the width).

SIZES: dict[str, int] = {
    "S": 192, "M": 256, "L": 320, "XL": 384, "XXL": 448,
    "tS": 12, "tM": 16, "tL": 20, "tXL": 24, "tXXL": 28,
}
PAPER_SIZES = ["S", "M", "L", "XL", "XXL"]
CPU_SIZES = ["tS", "tM", "tL", "tXL", "tXXL"]

# ----------------------------------------------------------------------------
# Datasets: shape of the data and the settings that come with it.

DATASETS: dict[str, dict[str, Any]] = {
    # Small images keep EDM2's shape: attention at the two lowest resolutions (EDM2 at 64x64: 16 and 8).
    "shapes": {"data.resolution": 16, "data.channels": 3, "data.label_dim": 8,
               "network.attn_resolutions": [4, 2]},
    "gmm": {"data.resolution": 4, "data.channels": 1, "data.label_dim": 0,
            "network.channel_mult": [1, 2], "network.attn_resolutions": [2]},
    "cifar10": {"data.resolution": 32, "data.channels": 3, "data.label_dim": 0, "data.xflip": True},
    "imagenet64": {"data.resolution": 64, "data.channels": 3, "data.label_dim": 1000},
    "imagenet512": {"data.resolution": 64, "data.channels": 4, "data.label_dim": 1000,
                    "data.latent_mean": [1.56, -0.695, 0.483, 0.729],
                    "data.latent_std": [5.27, 5.91, 4.21, 4.31]},
    "zip": {},  # shape and labels are the study's data.* keys
}

# ----------------------------------------------------------------------------
# PRESETS: one entry per (dataset, size) with the paper's hyperparameters (App. G), like EDM2's config table.


@dataclass(frozen=True)
class Preset:
    """The recipe of one (dataset, size). The CM learning rate is teacher_lr x cm_lr_factor (paper: 0.01)."""
    teacher_P: tuple[float, float]          # (P_mean, P_std) of the teacher's noise proposal
    cm_P: tuple[float, float]               # (P_mean, P_std) of sCT / sCD
    teacher_lr: float
    cm_lr_factor: float
    batch: int
    iters: dict[str, int]                   # training iterations per method (teacher, sct, scd)
    dropout: float                          # network dropout (a method's own overrides may change it)
    common: dict[str, Any] = field(default_factory=dict)    # dotted overrides for every method...
    cm: dict[str, Any] = field(default_factory=dict)        # ...then for sCT and sCD...
    sct: dict[str, Any] = field(default_factory=dict)       # ...then for one of them
    scd: dict[str, Any] = field(default_factory=dict)


def _iters(teacher: int, sct: int, scd: int) -> dict[str, int]:
    return {"teacher": teacher, "sct": sct, "scd": scd}


# The recipes: what every size of a dataset shares. Each preset line adds what varies with the size.
# CIFAR-10 (DDPM++-like width; Adam 1e-3 teacher, RAdam 1e-4 CM, half-life EMA 0.5 Mimg).
_CIFAR10 = dict(
    teacher_P=(-1.2, 1.2), cm_P=(-1.0, 1.4), cm_lr_factor=0.1, batch=512, iters=_iters(400_000, 400_000, 400_000),
    common={"network.model_channels": 128, "network.channel_mult": [2, 2, 2], "network.num_blocks": 4,
            "network.attn_resolutions": [16], "optim.beta2": 0.999, "ema.kind": "halflife",
            "ema.halflife_kimg": 500.0, "sampler.teacher_steps": 18},
    cm={"optim.name": "radam", "optim.beta2": 0.99},
    sct={"network.dropout": 0.20}, scd={"network.dropout": 0.0})
# ImageNet 64x64: EDM2's config (Adam eps 1e-11, betas (0.9, 0.99), batch 2048, t_ref 35k).
_IMAGENET64 = dict(
    teacher_P=(-0.8, 1.6), cm_P=(-1.0, 1.6), cm_lr_factor=0.01, batch=2048, iters=_iters(400_000, 400_000, 400_000),
    common={"optim.eps": 1e-11, "optim.lr_ref_iters": 35_000, "sampler.teacher_steps": 32})
# ImageNet 512x512 latents: t_ref 70k, sCT 100k / sCD 200k iters, CFG distillation s ~ U[1, 2].
_IMAGENET512 = dict(
    teacher_P=(-0.4, 1.0), cm_P=(-0.8, 1.6), cm_lr_factor=0.01, batch=2048, iters=_iters(400_000, 100_000, 200_000),
    common={"optim.eps": 1e-11, "optim.lr_ref_iters": 70_000, "sampler.teacher_steps": 32,
            "network.label_dropout": 0.1, "sampler.guidance": 1.4},
    cm={"loss.guidance_min": 1.0, "loss.guidance_max": 2.0, "network.guidance_input": True})
# The embedded CPU studies: the same recipe at a small batch, short runs and a faster CM learning rate;
# sCT from scratch needs the teacher's rate on this budget (the default sweep's best trials: lr 0.010-0.014).
_CPU = dict(
    teacher_P=(-0.8, 1.6), cm_P=(-1.0, 1.6), teacher_lr=1e-2, cm_lr_factor=0.1, batch=64,
    iters=_iters(2000, 1000, 1000), dropout=0.0,
    common={"optim.lr_ref_iters": 1000, "loss.warmup_iters": 50, "ema.sigma_rel": 0.1,
            "sampler.teacher_steps": 16, "run.checkpoint_kimg": 16.0},
    sct={"optim.lr": 1e-2})

PRESETS: dict[tuple[str, str], Preset] = {
    ("cifar10", "S"):       Preset(teacher_lr=1e-3,   dropout=0.13, **_CIFAR10),
    ("imagenet64", "S"):    Preset(teacher_lr=1e-2,   dropout=0.0,  **_IMAGENET64),
    ("imagenet64", "M"):    Preset(teacher_lr=9e-3,   dropout=0.0,  **_IMAGENET64),
    ("imagenet64", "L"):    Preset(teacher_lr=8e-3,   dropout=0.0,  **_IMAGENET64),
    ("imagenet64", "XL"):   Preset(teacher_lr=7e-3,   dropout=0.0,  **_IMAGENET64),
    ("imagenet512", "S"):   Preset(teacher_lr=1e-2,   dropout=0.0,  **_IMAGENET512),
    ("imagenet512", "M"):   Preset(teacher_lr=9e-3,   dropout=0.1,  **_IMAGENET512),
    ("imagenet512", "L"):   Preset(teacher_lr=8e-3,   dropout=0.1,  **_IMAGENET512),
    ("imagenet512", "XL"):  Preset(teacher_lr=7e-3,   dropout=0.1,  **_IMAGENET512),
    ("imagenet512", "XXL"): Preset(teacher_lr=6.5e-3, dropout=0.1,  **_IMAGENET512),
    **{(dataset, size): Preset(**_CPU) for dataset in ("shapes", "gmm") for size in CPU_SIZES},
}
# Your own EDM2 dataset ZIP (`data.name: zip`, with data.path/resolution/channels/label_dim set): EDM2's
# ImageNet 64x64 recipe at each of its sizes.
for _size in PAPER_SIZES[:4]:
    PRESETS[("zip", _size)] = PRESETS[("imagenet64", _size)]


def preset_datasets() -> list[str]:
    """The datasets a run can name: those with a line in PRESETS."""
    return sorted({d for d, _ in PRESETS})


def check_dataset(name: str, key: str) -> str:
    """`name` if it has presets, else an error naming `key` (a config key or a CLI flag) and the valid ones."""
    if name not in preset_datasets():
        raise ConfigError(f"{key}: {name!r} is not a dataset with presets; choose one of {preset_datasets()}",
                          key=key)
    return name


def preset_overrides(dataset: str, size: str, method: str) -> dict[str, Any]:
    """Dotted overrides that PRESETS implies for (dataset, size, method)."""
    check_dataset(dataset, "data.name")
    methods = _fields(RunConfig)["method"].metadata["choices"]
    if method not in methods:
        raise ConfigError(f"run.method: {method!r} is not allowed; choose one of {methods}", key="run.method")
    if (dataset, size) not in PRESETS:
        known = sorted({s for d, s in PRESETS if d == dataset})
        raise ConfigError(f"run.size: no preset for dataset={dataset!r} size={size!r}; sizes for {dataset!r}: "
                          f"{known}", key="run.size")
    p = PRESETS[(dataset, size)]
    cm = method != "teacher"
    P_mean, P_std = p.cm_P if cm else p.teacher_P
    out: dict[str, Any] = {
        "data.name": dataset, **DATASETS[dataset],
        "network.model_channels": SIZES[size], "run.size": size, "run.method": method,
        "loss.P_mean": P_mean, "loss.P_std": P_std, "optim.lr": p.teacher_lr * (p.cm_lr_factor if cm else 1.0),
        "run.batch_size": p.batch, "run.total_kimg": p.iters[method] * p.batch / 1000,
        "network.dropout": p.dropout,
    }
    # Overrides from general to specific; CMs train at a constant learning rate (no schedule).
    out.update(p.common)
    if cm:
        out["optim.lr_ref_iters"] = 0
        out.update(p.cm)
        out.update(p.sct if method == "sct" else p.scd)
    return out


# ----------------------------------------------------------------------------
# Overrides: dotted keys, parsed and validated against the dataclass fields.


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _resolve_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _parse_value(key: str, raw: Any, typ) -> Any:
    """Parse a raw value (a string from the command line, or a YAML scalar) to the field's type."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {raw!r}")
    if typ is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {raw!r}")
        try:
            return int(float(raw)) if isinstance(raw, str) and "e" in raw.lower() else int(raw)
        except (TypeError, ValueError, OverflowError):  # OverflowError: '1e999', inf
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
    if typ is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}: expected a number, got {raw!r}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
        # NaN passes every min/max comparison and inf overflows step counts: no field means either
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {raw!r}")
        return value
    if typ is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{key}: expected a string, got {raw!r}")
        return raw
    if typ is list or origin is list:
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("["):
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError:
                    raise ConfigError(f"{key}: expected a list like [1, 2], got {raw!r}") from None
            else:
                try:
                    raw = [float(s) if any(c in s.lower() for c in ".e") else int(s)
                           for s in text.split(",") if s.strip()]
                except ValueError:
                    raise ConfigError(f"{key}: expected a list of numbers like 1,2 or [1, 2], got {raw!r}") from None
        if not isinstance(raw, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {raw!r}")
        if any(isinstance(v, float) and not math.isfinite(v) for v in raw):
            raise ConfigError(f"{key}: expected finite numbers, got {raw!r}")
        return list(raw)
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover


def _check_range(key: str, value: Any, f: dataclasses.Field) -> None:
    m = f.metadata
    if m.get("choices") is not None and value not in m["choices"]:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {m['choices']}")
    if m.get("min") is not None and value < m["min"]:
        raise ConfigError(f"{key}: {value!r} is below the minimum {m['min']}")
    if m.get("max") is not None and value > m["max"]:
        raise ConfigError(f"{key}: {value!r} is above the maximum {m['max']}")


def apply_override(cfg: Config, key: str, raw: Any) -> None:
    """Set one dotted key (e.g. 'loss.tangent_norm') on cfg, parsing and validating the value."""
    try:
        _apply_override(cfg, key, raw)
    except ConfigError as e:
        e.key = e.key or key
        raise


def _apply_override(cfg: Config, key: str, raw: Any) -> None:
    parts = key.split(".")
    obj = cfg
    for i, name in enumerate(parts):
        fields = _fields(obj)
        if name not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key {key!r}: {where} has no field {name!r}; "
                              f"known: {sorted(fields)}")
        f = fields[name]
        if i < len(parts) - 1:
            obj = getattr(obj, name)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])} is not a section")
            continue
        typ = _resolve_type(type(obj), f)
        if dataclasses.is_dataclass(typ):
            example = dataclasses.fields(typ)[0].name
            raise ConfigError(f"{key} is a section; set one of its fields, e.g. {key}.{example}")
        value = _parse_value(key, raw, typ)
        _check_range(key, value, f)
        setattr(obj, name, value)


def check_overrides(overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """Dotted overrides (nested dicts allowed) checked field by field (key, type, range) without resolving a
    run; returns them flat. Errors start with `where` (the file or the key the overrides came from)."""
    flat = flatten(overrides)
    probe = Config()
    for key, value in flat.items():
        try:
            apply_override(probe, key, value)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}", key=e.key) from None
    return flat


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict (as from YAML) -> dotted keys; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_set(items: list[str]) -> dict[str, str]:
    """['a.b=1', ...] -> {'a.b': '1'}; a missing '=' is an error."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. loss.tangent_norm=clip)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def validate(cfg: Config) -> Config:
    """Cross-field checks that single fields cannot express."""
    if cfg.run.size not in SIZES:
        raise ConfigError(f"run.size: {cfg.run.size!r} is not a known size; choose one of {list(SIZES)}",
                          key="run.size")
    if cfg.loss.guidance_max < cfg.loss.guidance_min:
        raise ConfigError("loss.guidance_max must be >= loss.guidance_min", key="loss.guidance_max")
    if cfg.run.method == "scd" and cfg.loss.guidance_max > 1.0 and not cfg.network.guidance_input:
        raise ConfigError("loss.guidance_max > 1 needs network.guidance_input=true", key="loss.guidance_max")
    for key in ("channel_mult", "attn_resolutions"):
        values = getattr(cfg.network, key)
        if not values or not all(isinstance(v, int) and v > 0 for v in values):
            raise ConfigError(f"network.{key}: expected a non-empty list of positive integers, got {values!r}",
                              key=f"network.{key}")
    if cfg.data.resolution % (2 ** (len(cfg.network.channel_mult) - 1)):
        raise ConfigError(f"data.resolution={cfg.data.resolution} must be divisible by "
                          f"2^(len(network.channel_mult) - 1) = {2 ** (len(cfg.network.channel_mult) - 1)}")
    if cfg.data.gmm_mean_resolution and cfg.data.resolution % cfg.data.gmm_mean_resolution:
        raise ConfigError(f"data.gmm_mean_resolution={cfg.data.gmm_mean_resolution} must divide "
                          f"data.resolution={cfg.data.resolution}", key="data.gmm_mean_resolution")
    return cfg


def resolve(dataset: str = "shapes", size: str = "tS", method: str = "teacher",
            overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then PRESETS[(dataset, size)] for the method, then user overrides (dotted keys)."""
    overrides = dict(overrides or {})
    cfg = Config()
    for key, value in preset_overrides(dataset, size, method).items():
        apply_override(cfg, key, value)
    for key, value in overrides.items():
        apply_override(cfg, key, value)
    return validate(cfg)


# The short names a run file may use for the keys that pick the preset.
ALIASES = {"dataset": "data.name", "size": "run.size", "method": "run.method"}


def canonical_key(key: str) -> str:
    return ALIASES.get(key, key)


def resolve_from_dict(d: dict[str, Any], extra: dict[str, Any] | None = None) -> Config:
    """Resolve a config file's contents: `dataset`, `size`, `method` pick the preset; the rest are overrides.
    `extra` (dotted keys) wins over `d`, whichever spelling (`method` or `run.method`) each uses.
    A complete config (every field: a pipeline's run.yaml, config.json, a sweep's best.yaml) is taken as
    it is: it was resolved once already, and presets would only be overwritten."""
    flat = {canonical_key(k): v for k, v in flatten(d).items()}
    flat.update({canonical_key(k): v for k, v in (extra or {}).items()})
    if set(flat) >= {row["key"] for row in field_docs()}:
        return from_dict(flat)
    dataset = flat.pop("data.name", "shapes")
    size = flat.pop("run.size", "tS")
    method = flat.pop("run.method", "teacher")
    return resolve(str(dataset), str(size), str(method), flat)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> Config:
    """Inverse of to_dict (strict: unknown keys are errors)."""
    cfg = Config()
    for key, value in flatten(d).items():
        apply_override(cfg, key, value)
    return validate(cfg)


# Settings that do not change what a run computes: a run directory is resumed across changes of these.
IDENTITY_NEUTRAL = {"run.tracker", "run.tracker_project"}


def config_hash(cfg: Config) -> str:
    """Short stable hash of the resolved config without IDENTITY_NEUTRAL keys (run identity, cache keys)."""
    d = to_dict(cfg)
    for key in IDENTITY_NEUTRAL:
        section, name = key.split(".")
        d[section].pop(name, None)
    text = json.dumps(d, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def field_docs(cls=Config, prefix: str = "") -> list[dict[str, Any]]:
    """Every field as {key, type, default, help, choices, min, max} (for schemas and docs)."""
    rows = []
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            rows += field_docs(typ, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = typ.__name__ if isinstance(typ, type) else str(typ)
        if isinstance(typ, types.GenericAlias):
            name = "list"
        rows.append({"key": prefix + f.name, "type": name, "default": default, **f.metadata})
    return rows
