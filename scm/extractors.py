"""Feature extractors: the project's own network for the embedded `shapes` set, FD_DINOv2's wrapper, and
the weights torch-fidelity's Inception needs; registered with torch-fidelity under their names.

- 'scm-shapes-v3': a small CNN trained by the project on the embedded set (class, reconstruction and
  colour/background statistics, plus the pixel-noise level read off the image itself); one per renderer
  version, trained deterministically on first use (`scm data build-extractor`).
- 'scm-dinov2-edm2': EDM2's FD_DINOv2 preprocessing around a local DINOv2 file.
- 'inception-v3-compat': torch-fidelity's, weights from a local file.
- Nothing here downloads except fetch_inception_weights / fetch_dinov2_weights (`scm data fetch-weights`).
scm.metrics computes the metrics on their features.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from scm.fileio import file_fingerprint

log = logging.getLogger(__name__)

# 1: a classifier only; 2: class + reconstruction (sees colour and background); 3: 2 + the noise level of the
# image's flat parts (sees pixel noise of a few grey levels, which 2 did not resolve below sigma = 0.1)
SHAPES_EXTRACTOR_VERSION = 3
SHAPES_EXTRACTOR = f"scm-shapes-v{SHAPES_EXTRACTOR_VERSION}"
DINOV2_EXTRACTOR = "scm-dinov2-edm2"
INCEPTION_EXTRACTOR = "inception-v3-compat"
DEFAULT_SHAPES_EXTRACTOR_PATH = f"results/artifacts/shapes-features-v{SHAPES_EXTRACTOR_VERSION}-data1.pt"


class WeightsMissingError(FileNotFoundError):
    """A feature extractor's local weights file is missing (evaluation never downloads)."""


# ----------------------------------------------------------------------------
# The 'shapes' feature network (extractor version 3): a small CNN trained by the project on the embedded set
# to see everything that makes an image, not only its class. One code z (a linear map of the last 4x4
# feature map, so that position survives) feeds two heads: the class (cross-entropy) and a decoder that
# redraws the whole image from z (mean squared error). A classifier alone is invariant to colour, background
# and texture (version 1 scored blobs in the right colours near real images); the reconstruction term makes
# z encode colour, geometry and background, the class term keeps the classes apart in z. FID features = z
# scaled so that real features have unit RMS (an Inception-like scale). One network per renderer version
# (data.shapes_version): trained on that version's images, named after both versions.
# Version 3 appends, per channel, the noise level of the image's flattest pixels (noise_statistics), computed
# from the pixels, not learned: a CNN trained to redraw and classify smooths pixel noise away, so version 2 put
# Gaussian noise of sigma = 0.02 and 0.05 at the real-vs-real floor.


NUM_IMAGE_STATISTICS = 18
NUM_NOISE_STATISTICS = 3
NOISE_QUANTILE = 0.1  # the flattest 10% of pixels: 0 on every real image of renderer version 2


class ShapesFeatureNet(torch.nn.Module):
    def __init__(self, channels=(32, 64, 128), code_dim: int = 128, num_classes: int = 8, resolution: int = 16,
                 stats_weight: float = 2.0, noise_weight: float = 0.5):
        super().__init__()
        c1, c2, c3 = channels
        r4 = resolution // 4
        conv = lambda a, b: torch.nn.Conv2d(a, b, 3, padding=1)
        self.body = torch.nn.Sequential(
            conv(3, c1), torch.nn.ReLU(), conv(c1, c1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            conv(c1, c2), torch.nn.ReLU(), torch.nn.MaxPool2d(2), conv(c2, c3), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(c3 * r4 * r4, code_dim))
        self.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(code_dim, num_classes))
        self.stats_head = torch.nn.Linear(code_dim, NUM_IMAGE_STATISTICS)
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(code_dim, c2 * r4 * r4), torch.nn.Unflatten(1, (c2, r4, r4)), torch.nn.ReLU(),
            torch.nn.Upsample(scale_factor=2), conv(c2, c1), torch.nn.ReLU(),
            torch.nn.Upsample(scale_factor=2), conv(c1, 3))
        # Set after training so that the real codes have unit RMS; the statistics (standardized targets)
        # enter with weight stats_weight each, the noise levels (log(1 + grey levels)) with noise_weight.
        self.register_buffer("feature_scale", torch.ones(()))
        self.register_buffer("stats_weight", torch.tensor(float(stats_weight)))
        self.register_buffer("noise_weight", torch.tensor(float(noise_weight)))
        self.feature_dim = code_dim + NUM_IMAGE_STATISTICS + NUM_NOISE_STATISTICS

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] (B, 3, H, W) -> (features (B, code_dim + 18 + 3), logits (B, classes)). Features: the
        code (unit RMS on real images), the 18 image statistics read from it, so that colour and background
        weigh in FID as much as what dominates the code's variance (the class), and the 3 noise levels."""
        z = self.body(x)
        f = torch.cat([z * self.feature_scale, self.stats_weight * self.stats_head(z),
                       self.noise_weight * noise_statistics(x)], 1)
        return f, self.head(z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.body(x))


def image_statistics(x: torch.Tensor) -> torch.Tensor:
    """(B, 18) colour and background targets that are functions of the image x (B, 3, H, W): per channel the
    mean, sd, min and max (the two colours: shape and background) and the mean difference right - left and
    bottom - top halves (the background gradient)."""
    h, w = x.shape[2] // 2, x.shape[3] // 2
    lr = x[..., w:].mean((2, 3)) - x[..., :w].mean((2, 3))
    tb = x[:, :, h:].mean((2, 3)) - x[:, :, :h].mean((2, 3))
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), x.amin((2, 3)), x.amax((2, 3)), lr, tb], 1)


def noise_statistics(x: torch.Tensor) -> torch.Tensor:
    """(B, 3) per channel log(1 + n), n = the NOISE_QUANTILE quantile over interior pixels of |4-neighbour
    Laplacian| in grey levels (x in [-1, 1], 127.5 per unit): the noise level where the image is flat (a
    robust, order-statistic estimate; edges only raise the upper quantiles). Zero on flat real images; on a
    flat image with Gaussian pixel noise of sd s grey levels, n = 0.126 sqrt(20) s (the half-normal's 10%
    point of the Laplacian's sd). The log keeps every noise level apart without letting heavy noise swamp
    colour and geometry."""
    lap = 127.5 * (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])
    a = lap.abs().flatten(2)
    k = max(1, math.ceil(NOISE_QUANTILE * a.shape[2]))
    return torch.log1p(a.kthvalue(k, dim=2).values)


@contextlib.contextmanager
def _one_thread_seeded(seed: int):
    """One torch thread and a private global RNG state (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def shapes_extractor_path(shapes_version: int = 1, root="results/artifacts") -> Path:
    """Where the extractor for renderer version `shapes_version` lives by default."""
    return Path(root) / f"shapes-features-v{SHAPES_EXTRACTOR_VERSION}-data{shapes_version}.pt"


def train_shapes_extractor(path=None, shapes_version: int = 1, steps: int = 500, batch: int = 128,
                           lr: float = 3e-3, seed: int = 0, train_images: int = 8192, test_images: int = 2048,
                           resolution: int = 16, recon_weight: float = 10.0, stats_weight: float = 1.0,
                           label_smoothing: float = 0.1) -> dict:
    """Train the shapes feature network on renderer version `shapes_version` and save {version, state_dict,
    meta} atomically to `path` (default shapes_extractor_path(shapes_version)); returns meta (held-out class
    accuracy and reconstruction RMSE on a set drawn with another seed, settings, torch version; train_seconds:
    the training steps, job_seconds: everything from rendering the sets to saving)."""
    from scm.shapes import SHAPE_CLASSES, generate_shapes

    t0 = time.time()
    path = Path(path or shapes_extractor_path(shapes_version))
    # Train and test sets with their own seeds (runs train on seed 0: none of these images).
    xtr, ytr = (torch.from_numpy(a) for a in generate_shapes(train_images, resolution, 1001, shapes_version))
    xte, yte = (torch.from_numpy(a) for a in generate_shapes(test_images, resolution, 1002, shapes_version))
    xtr, xte = xtr.float() / 127.5 - 1, xte.float() / 127.5 - 1
    # Statistics targets standardized over the training set (each weighs alike in the loss).
    st = image_statistics(xtr)
    st_mean, st_sd = st.mean(0), st.std(0).clamp(min=1e-3)
    with _one_thread_seeded(seed):
        net = ShapesFeatureNet(num_classes=len(SHAPE_CLASSES), resolution=resolution)
        opt = torch.optim.Adam(net.parameters(), lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
        g = torch.Generator().manual_seed(seed)
        t_steps = time.time()
        # Random batches with horizontal flips (every class is symmetric under them; the target flips too).
        for _ in range(steps):
            idx = torch.randint(len(xtr), (batch,), generator=g)
            flip = (torch.rand(batch, generator=g) < 0.5)[:, None, None, None]
            x = torch.where(flip, xtr[idx].flip(-1), xtr[idx])
            z = net.body(x)
            # Label smoothing bounds the logits, so that the class directions do not swamp z's variance.
            ce = F.cross_entropy(net.head(z), ytr[idx], label_smoothing=label_smoothing)
            mse = F.mse_loss(net.decoder(z), x)
            stats = F.mse_loss(net.stats_head(z), (image_statistics(x) - st_mean) / st_sd)
            loss = ce + recon_weight * mse + stats_weight * stats
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        steps_seconds = time.time() - t_steps
        net.eval()
        with torch.no_grad():
            acc = float((net(xte)[1].argmax(1) == yte).float().mean())
            rmse = float((net.reconstruct(xte) - xte).square().mean().sqrt())
            stats_r2 = float(1 - (net.stats_head(net.body(xte)) - (image_statistics(xte) - st_mean) / st_sd)
                             .square().mean() / ((image_statistics(xte) - st_mean) / st_sd).var(0).mean())
            rms = float(torch.cat([net.body(x) for x in xtr.split(1024)]).square().mean().sqrt())
            net.feature_scale.fill_(1.0 / rms)
    meta = {"name": SHAPES_EXTRACTOR, "version": SHAPES_EXTRACTOR_VERSION, "shapes_version": shapes_version,
            "test_accuracy": acc, "test_recon_rmse": rmse, "test_stats_r2": stats_r2, "test_images": test_images,
            "train_images": train_images, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "recon_weight": recon_weight, "stats_weight": stats_weight, "label_smoothing": label_smoothing,
            "resolution": resolution, "code_dim": net.head[1].in_features, "feature_dim": net.feature_dim,
            "stats_feature_weight": float(net.stats_weight), "noise_feature_weight": float(net.noise_weight),
            "noise_quantile": NOISE_QUANTILE,
            "feature_scale": 1.0 / rms, "classes": list(SHAPE_CLASSES), "final_ce": float(ce.detach()),
            "final_mse": float(mse.detach()), "final_stats_mse": float(stats.detach()), "torch": str(torch.__version__)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # No timings or file names in the bytes (torch.save to a path embeds its stem): the same training gives
    # the same file, hence the same reference names.
    buf = io.BytesIO()
    torch.save({"version": SHAPES_EXTRACTOR_VERSION, "state_dict": net.state_dict(), "meta": meta}, buf)
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    seconds = round(time.time() - t0, 2)
    log.info("shapes feature extractor: test accuracy %.4f, reconstruction RMSE %.4f, %.1f s -> %s",
             acc, rmse, seconds, path)
    return {**meta, "train_seconds": round(steps_seconds, 2), "job_seconds": seconds}


def ensure_shapes_extractor(path=None, shapes_version: int = 1) -> Path:
    """The artifact at `path` (default shapes_extractor_path(shapes_version)), trained first if missing."""
    path = Path(path or shapes_extractor_path(shapes_version))
    if not path.exists():
        log.info("shapes feature extractor %s missing: training it (deterministic, ~1 min)", path)
        train_shapes_extractor(path, shapes_version)
    return path


def load_shapes_extractor(path, shapes_version: int | None = None) -> tuple[ShapesFeatureNet, dict]:
    """(network in eval mode, meta); with `shapes_version`, the network must be trained on that renderer."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != SHAPES_EXTRACTOR_VERSION:
        raise ValueError(f"{path}: shapes extractor version {state.get('version')}, expected "
                         f"{SHAPES_EXTRACTOR_VERSION}; delete it to retrain")
    meta = state["meta"]
    if shapes_version is not None and meta["shapes_version"] != shapes_version:
        raise ValueError(f"{path}: shapes extractor trained on data.shapes_version {meta['shapes_version']}, "
                         f"the data is version {shapes_version}; pass the matching --extractor-weights")
    net = ShapesFeatureNet(num_classes=len(meta["classes"]), code_dim=meta["code_dim"], resolution=meta["resolution"])
    net.load_state_dict(state["state_dict"])
    return net.eval().requires_grad_(False), meta


def _check_uint8(x: torch.Tensor, name: str) -> None:
    if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected uint8 images (B, 3, H, W), got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")


class _Uncompiled(FeatureExtractorBase):
    """torch-fidelity's compile hooks, shared by our extractors: they run eagerly."""

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)


class ShapesFeatureExtractor(_Uncompiled):
    """torch-fidelity extractor around ShapesFeatureNet: uint8 (B, 3, 16, 16) -> 'penultimate' / 'logits'."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net, self.meta = load_shapes_extractor(ensure_shapes_extractor(feature_extractor_weights_path))

    def forward(self, x):
        _check_uint8(x, self.name)
        res = self.meta["resolution"]
        if tuple(x.shape[2:]) != (res, res):
            raise ValueError(f"{self.name}: trained on {res}x{res} images, got {tuple(x.shape[2:])}")
        f, logits = self.net(x.float() / 127.5 - 1)
        out = {"penultimate": f, "logits": logits}
        return tuple(out[k] for k in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return ("penultimate", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]


# ----------------------------------------------------------------------------
# FD_DINOv2 as EDM2 computes it: bicubic antialiased resize to 224, [0, 1], ImageNet mean/std, CLS features
# of ViT-L/14. The model comes from a local file (TorchScript, or torch.export's .pt2), never torch.hub.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_model_file(path) -> torch.nn.Module:
    """A TorchScript archive (torch.jit.save) or a torch.export program (.pt2)."""
    path = Path(path)
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.14, still works
        return torch.jit.load(str(path), map_location="cpu")


class DinoV2Extractor(_Uncompiled):
    INPUT_SIZE = 224

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if not feature_extractor_weights_path or not Path(feature_extractor_weights_path).exists():
            raise WeightsMissingError(
                f"DINOv2 model file {feature_extractor_weights_path!r} not found; on a machine with internet "
                "run `scm data fetch-weights dinov2 --out PATH` and pass that path")
        self.model = load_model_file(feature_extractor_weights_path)
        self.model.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        _check_uint8(x, self.name)
        x = F.interpolate(x.float(), size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bicubic",
                          antialias=True, align_corners=False)
        x = (x / 255 - self.mean) / self.std
        f = self.model(x)
        # DINOv2's forward returns the normed CLS token; accept a dict or a token sequence too.
        if isinstance(f, dict):
            f = f["x_norm_clstoken"]
        if f.ndim == 3:
            f = f[:, 0]
        return (f.float(),)

    @staticmethod
    def get_provided_features_list():
        return ("dinov2",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "dinov2"


def register_extractors() -> None:
    """Register our extractors with torch-fidelity once per process (registering twice raises)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    for name, cls in ((SHAPES_EXTRACTOR, ShapesFeatureExtractor), (DINOV2_EXTRACTOR, DinoV2Extractor)):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, cls)


# ----------------------------------------------------------------------------
# Fetching weights: the only code that downloads (`scm data fetch-weights`).


def fetch_inception_weights(out) -> Path:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(URL_INCEPTION_V3, str(out))
    return out


def fetch_dinov2_weights(out) -> Path:
    """DINOv2 ViT-L/14 from torch.hub, saved as TorchScript (traced at 224x224) or as torch.export (.pt2)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XFORMERS_DISABLED", "1")
    hub = torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14", trust_repo=True).eval()

    class CLS(torch.nn.Module):  # forward(x) -> normed CLS token (DINOv2's forward takes *args)
        def __init__(self):
            super().__init__()
            self.m = hub

        def forward(self, x):
            return self.m(x)

    model, example = CLS().eval(), torch.zeros(2, 3, 224, 224)
    if out.suffix == ".pt2":
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}), str(out))
    else:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.jit.trace(model, example, check_trace=False).save(str(out))
    return out


# ----------------------------------------------------------------------------
# Extractor choice and weights: evaluation never downloads.


def default_extractor(dataset: str) -> str:
    return SHAPES_EXTRACTOR if dataset == "shapes" else INCEPTION_EXTRACTOR


def resolve_weights(extractor: str, weights_path=None, shapes_version: int = 1) -> Path:
    """The local weights file of `extractor`; the shapes network (of renderer `shapes_version`) is trained if
    missing, others are errors."""
    if extractor == SHAPES_EXTRACTOR:
        return ensure_shapes_extractor(weights_path, shapes_version)
    hint = {INCEPTION_EXTRACTOR: "inception", DINOV2_EXTRACTOR: "dinov2"}.get(extractor)
    if hint is None:
        raise ValueError(f"unknown feature extractor {extractor!r}; choose {SHAPES_EXTRACTOR}, "
                         f"{INCEPTION_EXTRACTOR} or {DINOV2_EXTRACTOR}")
    if not weights_path or not Path(weights_path).exists():
        raise WeightsMissingError(
            f"{extractor}: weights file {weights_path!r} not found; evaluation never downloads. On a machine "
            f"with internet run `scm data fetch-weights {hint} --out PATH`, then pass --extractor-weights PATH")
    return Path(weights_path)


def extractor_info(extractor: str, weights_path) -> dict:
    """What identifies the extractor in metrics.json and cache names."""
    info = {"feature_extractor": extractor, "extractor_fingerprint": file_fingerprint(weights_path)}
    if extractor == SHAPES_EXTRACTOR:
        meta = torch.load(weights_path, map_location="cpu", weights_only=True)["meta"]
        info.update({"extractor_accuracy": meta["test_accuracy"], "extractor_shapes_version": meta["shapes_version"]})
    return info
