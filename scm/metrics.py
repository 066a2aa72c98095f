"""Image-quality metrics (FID, KID, precision/recall, FD_DINOv2) through torch-fidelity.

- Every metric goes through `torch_fidelity.calculate_metrics`, generated images fed as a Dataset of
  uint8 CHW tensors (GenerativeModelModuleWrapper with classes crashes on numpy >= 1.24; stack-notes).
- Feature extractors: torch-fidelity's 'inception-v3-compat' (real datasets, weights from a local file),
  the project's own small CNN for the embedded 'shapes' set ('scm-shapes-v2': class, reconstruction and
  colour/background statistics; one per renderer version, trained deterministically on first use) and
  EDM2's FD_DINOv2 preprocessing around a local DINOv2 file ('scm-dinov2-edm2').
- Class-aware metrics of conditional samples (shapes): class accuracy (the extractor's classifier) and the
  Fréchet joint distance of (features, label) (DeVries et al. 2019). Calibration: scm.calibration.
- Reference statistics are named `{dataset}[-data{shapes version}]-{extractor}-{hash12}` where the hash
  covers the real images' bytes and the extractor's weights (torch-fidelity's own cache keys ignore
  content): mu/sigma (float64) go to `{name}.npz` (EDM's format) and torch-fidelity caches the real
  features under the same name.
- Nothing here downloads except fetch_inception_weights / fetch_dinov2_weights (`scm data fetch-weights`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

log = logging.getLogger(__name__)

SHAPES_EXTRACTOR_VERSION = 2  # 1: a classifier only; 2: class + reconstruction (sees colour and background)
SHAPES_EXTRACTOR = f"scm-shapes-v{SHAPES_EXTRACTOR_VERSION}"
DINOV2_EXTRACTOR = "scm-dinov2-edm2"
INCEPTION_EXTRACTOR = "inception-v3-compat"
DEFAULT_SHAPES_EXTRACTOR_PATH = f"results/artifacts/shapes-features-v{SHAPES_EXTRACTOR_VERSION}-data1.pt"
DEFAULT_CACHE_DIR = "results/cache/ref-stats"
REF_STATS_VERSION = 1  # bump when the naming or the statistics change meaning


class WeightsMissingError(FileNotFoundError):
    """A feature extractor's local weights file is missing (evaluation never downloads)."""


class NoReferenceError(ValueError):
    """No way to build reference statistics for this dataset (no real images and no imported stats)."""


# ----------------------------------------------------------------------------
# Fréchet distance in float64: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).
# scipy is not in the venv; tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2) (similar matrices), and the latter
# is symmetric PSD, so two symmetric eigendecompositions give it without sqrtm.


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape} (different feature extractors?)")
    s1h = _sqrt_psd(sigma1)
    m = s1h @ sigma2 @ s1h
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64; sigma with ddof = 1 as torch-fidelity and EDM."""
    f = np.asarray(features.cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


# ----------------------------------------------------------------------------
# Reference statistics files: EDM's .npz (mu, sigma); EDM2's .pkl ({'fid': {mu, sigma}, 'fd_dinov2': ...}).


def save_ref_stats(path, mu, sigma, meta: dict | None = None) -> Path:
    """EDM-style .npz with mu and sigma (float64), plus a JSON `meta` string EDM's loaders ignore."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             meta=np.array(json.dumps(meta or {}, sort_keys=True)))
    # Atomic write: parallel evaluations may build the same reference at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def load_ref_stats(path, key: str = "fid") -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, meta) from an EDM .npz or an EDM2 .pkl (`key` selects 'fid' or 'fd_dinov2'; trusted files only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference statistics {path} not found")
    if path.suffix == ".pkl":
        with open(path, "rb") as f:
            d = pickle.load(f)  # noqa: S301 (EDM2 publishes its statistics as pickles)
        if key not in d:
            raise KeyError(f"{path}: no {key!r} statistics; it has {sorted(d)}")
        return np.asarray(d[key]["mu"], np.float64), np.asarray(d[key]["sigma"], np.float64), {"source": str(path)}
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        return np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64), meta


# ----------------------------------------------------------------------------
# Content hashes: of image bytes and of weight files (memoized by path, size and mtime).

_FILE_HASHES: dict[tuple, str] = {}


def file_fingerprint(path) -> str:
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()[:16]
    return _FILE_HASHES[key]


def content_hash(images, *extra: str) -> str:
    """12 hex digits of sha256 over a version tag, the images' shape, dtype and bytes, and `extra` strings."""
    arr = np.ascontiguousarray(images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images))
    h = hashlib.sha256(f"scm-ref-v{REF_STATS_VERSION}|{arr.shape}|{arr.dtype}".encode())
    h.update(memoryview(arr).cast("B"))
    for e in extra:
        h.update(f"|{e}".encode())
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------
# Images as torch-fidelity wants them: a Dataset of uint8 (C, H, W) tensors.


class ImageTensorDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 as EDM2 does: floor(x * 127.5 + 128) clipped (round half up)."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------
# The 'shapes' feature network (extractor version 2): a small CNN trained by the project on the embedded set
# to see everything that makes an image, not only its class. One code z (a linear map of the last 4x4
# feature map, so that position survives) feeds two heads: the class (cross-entropy) and a decoder that
# redraws the whole image from z (mean squared error). A classifier alone is invariant to colour, background
# and texture (version 1 scored blobs in the right colours near real images); the reconstruction term makes
# z encode colour, geometry and background, the class term keeps the classes apart in z. FID features = z
# scaled so that real features have unit RMS (an Inception-like scale). One network per renderer version
# (data.shapes_version): trained on that version's images, named after both versions.


NUM_IMAGE_STATISTICS = 18


class ShapesFeatureNet(torch.nn.Module):
    def __init__(self, channels=(32, 64, 128), code_dim: int = 128, num_classes: int = 8, resolution: int = 16,
                 stats_weight: float = 2.0):
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
        # enter with weight stats_weight each.
        self.register_buffer("feature_scale", torch.ones(()))
        self.register_buffer("stats_weight", torch.tensor(float(stats_weight)))
        self.feature_dim = code_dim + NUM_IMAGE_STATISTICS

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] (B, 3, H, W) -> (features (B, code_dim + 18), logits (B, classes)). Features: the code
        (unit RMS on real images) and the 18 image statistics read from it, so that colour and background
        weigh in FID as much as what dominates the code's variance (the class)."""
        z = self.body(x)
        f = torch.cat([z * self.feature_scale, self.stats_weight * self.stats_head(z)], 1)
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
    accuracy and reconstruction RMSE on a set drawn with another seed, settings, torch version, seconds)."""
    from scm.data import SHAPE_CLASSES, generate_shapes

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
            "stats_feature_weight": float(net.stats_weight),
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
    return {**meta, "train_seconds": seconds}


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


# ----------------------------------------------------------------------------
# Metrics. Real images: one calculate_metrics call per generated set; torch-fidelity caches the real
# features under our content-hashed name. Imported statistics (no real images): FD from features.


@dataclass
class Reference:
    """Real images (uint8) or imported statistics, with the extractor that compares against them; `labels`
    (int64, conditional data) enable the class-aware metrics; `shapes_version` names the renderer."""

    dataset: str
    extractor: str
    weights_path: Path
    cache_dir: Path
    images: torch.Tensor | None = None
    stats_path: Path | None = None  # imported .npz/.pkl when there are no images
    labels: torch.Tensor | None = None
    shapes_version: int | None = None

    @functools.cached_property
    def name(self) -> str:
        if self.images is None:
            return Path(self.stats_path).stem
        data = self.dataset if self.shapes_version is None else f"{self.dataset}-data{self.shapes_version}"
        return f"{data}-{self.extractor}-" + content_hash(self.images, self.extractor,
                                                          file_fingerprint(self.weights_path))

    @functools.cached_property
    def real_features(self) -> torch.Tensor:
        """FID features of the real images (float64), for the joint distance."""
        return extract_features(self.images, self).double()


def make_reference(dataset: str, images: torch.Tensor | None = None, extractor: str | None = None,
                   weights_path=None, cache_dir=DEFAULT_CACHE_DIR, stats_path=None, labels=None,
                   shapes_version: int | None = None) -> Reference:
    """The reference of `dataset`. Shapes: the extractor of renderer `shapes_version` (default path, trained
    if missing; given weights must match that version); without `shapes_version` the weights' own."""
    if images is None and stats_path is None:
        raise NoReferenceError(f"{dataset}: no real images to compare against; pass reference statistics "
                              "(EDM .npz or EDM2 .pkl) with --ref-stats")
    extractor = extractor or default_extractor(dataset)
    register_extractors()
    weights = resolve_weights(extractor, weights_path, shapes_version or 1)
    if extractor == SHAPES_EXTRACTOR:
        shapes_version = load_shapes_extractor(weights, shapes_version)[1]["shapes_version"]
    if labels is not None and images is not None and len(labels) != len(images):
        raise ValueError(f"{dataset}: {len(labels)} labels for {len(images)} reference images")
    return Reference(dataset, extractor, weights, Path(cache_dir), images, Path(stats_path) if stats_path else None,
                     labels, shapes_version if extractor == SHAPES_EXTRACTOR else None)


def _fidelity_kwargs(ref: Reference, device: str, batch_size: int) -> dict:
    return dict(feature_extractor=ref.extractor, feature_extractor_weights_path=str(ref.weights_path),
                cuda=torch.device(device).type == "cuda", batch_size=batch_size, verbose=False,
                save_cpu_ram=True, cache=True, cache_root=str(ref.cache_dir))


def extract_features(images: torch.Tensor, ref: Reference, device: str = "cpu", batch_size: int = 256,
                     layer: str | None = None) -> torch.Tensor:
    """Features of `images` by torch-fidelity's own extraction loop (the same numbers calculate_metrics sees)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    kw = _fidelity_kwargs(ref, device, batch_size)
    layer = layer or FEATURE_EXTRACTORS_REGISTRY[ref.extractor].get_default_feature_layer_for_metric("fid")
    fe = create_feature_extractor(ref.extractor, [layer], cuda=kw["cuda"], verbose=False,
                                  feature_extractor_weights_path=kw["feature_extractor_weights_path"])
    return get_featuresdict_from_dataset(ImageTensorDataset(images), fe, batch_size, kw["cuda"], True, False)[layer]


def reference_stats(ref: Reference, device: str = "cpu", batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, Path]:
    """(mu, sigma, path): imported statistics, or `{cache_dir}/{ref.name}.npz`, computed once from the real
    features (through torch-fidelity's feature cache, so calculate_metrics reuses them)."""
    if ref.images is None:
        mu, sigma, _ = load_ref_stats(ref.stats_path, "fd_dinov2" if ref.extractor == DINOV2_EXTRACTOR else "fid")
        return mu, sigma, ref.stats_path
    path = ref.cache_dir / f"{ref.name}.npz"
    if path.exists():
        mu, sigma, _ = load_ref_stats(path)
        return mu, sigma, path
    from torch_fidelity.utils import (
        create_feature_extractor,
        extract_featuresdict_from_input_id_cached,
        resolve_feature_layer_for_metric,
    )

    kw = {**_fidelity_kwargs(ref, device, batch_size), "input2": ImageTensorDataset(ref.images),
          "input2_cache_name": ref.name}
    layer = resolve_feature_layer_for_metric("fid", **kw)
    fe = create_feature_extractor(ref.extractor, [layer], **kw)
    feats = extract_featuresdict_from_input_id_cached(2, fe, **kw)[layer]
    mu, sigma = feature_statistics(feats)
    save_ref_stats(path, mu, sigma, {"dataset": ref.dataset, "extractor": ref.extractor, "layer": layer,
                                     "num_images": len(ref.images), "name": ref.name,
                                     "extractor_fingerprint": file_fingerprint(ref.weights_path),
                                     "version": REF_STATS_VERSION})
    log.info("reference statistics %s (%d images)", path, len(ref.images))
    return mu, sigma, path


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, ref: Reference, device: str = "cpu",
                   batch_size: int = 256) -> float:
    """Fraction of `images` that the shapes extractor's classifier assigns to `labels` (the labels the samples
    were conditioned on): 'a person recognizes the samples', made measurable (chance: 1 / classes)."""
    if ref.extractor != SHAPES_EXTRACTOR:
        raise ValueError(f"class accuracy needs the shapes extractor's classifier, not {ref.extractor}")
    logits = extract_features(images, ref, device, batch_size, layer="logits")
    return float((logits.argmax(1).cpu() == labels.cpu()).double().mean())


def frechet_joint_distance(features, labels, real_features, real_labels, num_classes: int) -> float:
    """FJD (DeVries et al. 2019): the Fréchet distance between the joint distributions of (features,
    alpha * one-hot label), alpha = RMS norm of the real features, so that both parts weigh alike. Blind
    FID misses samples of the wrong class when the class marginal is right; FJD does not."""
    real_features = torch.as_tensor(real_features, dtype=torch.float64)
    alpha = float(real_features.square().sum(1).mean().sqrt())
    joint = lambda f, y: torch.cat([torch.as_tensor(f, dtype=torch.float64).cpu(),
                                    alpha * F.one_hot(torch.as_tensor(y).cpu(), num_classes).double()], 1)
    return frechet_distance(*feature_statistics(joint(features, labels)),
                            *feature_statistics(joint(real_features, real_labels)))


def compute_metrics(generated: torch.Tensor, ref: Reference, kid: bool = True, prc: bool = True,
                    device: str = "cpu", batch_size: int = 256, kid_subsets: int = 100,
                    labels: torch.Tensor | None = None) -> dict:
    """{fid, kid, kid_sd, precision, recall, class_accuracy, fjd} of uint8 `generated` against `ref` (None
    where unavailable). `labels`: the classes the samples were conditioned on; with the shapes extractor they
    give class_accuracy, and with reference labels fjd."""
    out = _class_metrics(generated, labels, ref, device, batch_size)
    if ref.images is None:
        # Imported statistics: FD from our float64 statistics of the generated features.
        mu, sigma, _ = reference_stats(ref, device, batch_size)
        g_mu, g_sigma = feature_statistics(extract_features(generated, ref, device, batch_size))
        return {"fid": frechet_distance(g_mu, g_sigma, mu, sigma), "kid": None, "kid_sd": None,
                "precision": None, "recall": None, **out}
    import torch_fidelity

    subset = min(1000, len(generated), len(ref.images))
    kw = {**_fidelity_kwargs(ref, device, batch_size), "input1": ImageTensorDataset(generated),
          "input2": ImageTensorDataset(ref.images), "input2_cache_name": ref.name,
          "fid": True, "kid": kid and subset >= 2, "prc": prc and subset > 3,  # PR: 3 nearest neighbours
          "kid_subset_size": subset, "kid_subsets": kid_subsets}
    m = torch_fidelity.calculate_metrics(**kw)
    reference_stats(ref, device, batch_size)  # the .npz record (from the cached real features)
    get = lambda k: float(m[k]) if k in m else None
    return {"fid": get(torch_fidelity.KEY_METRIC_FID), "kid": get(torch_fidelity.KEY_METRIC_KID_MEAN),
            "kid_sd": get(torch_fidelity.KEY_METRIC_KID_STD), "precision": get(torch_fidelity.KEY_METRIC_PRECISION),
            "recall": get(torch_fidelity.KEY_METRIC_RECALL), **out}


def _class_metrics(generated, labels, ref: Reference, device: str, batch_size: int) -> dict:
    """class_accuracy and fjd where the labels, the classifier and the real labels allow them."""
    out = {"class_accuracy": None, "fjd": None}
    if labels is None or ref.extractor != SHAPES_EXTRACTOR:
        return out
    if len(labels) != len(generated):
        raise ValueError(f"{len(labels)} labels for {len(generated)} generated images")
    out["class_accuracy"] = class_accuracy(generated, labels, ref, device, batch_size)
    if ref.labels is not None and ref.images is not None:
        feats = extract_features(generated, ref, device, batch_size)
        out["fjd"] = frechet_joint_distance(feats, labels, ref.real_features, ref.labels,
                                            len(ref_classes(ref)))
    return out


def ref_classes(ref: Reference) -> list[str]:
    return torch.load(ref.weights_path, map_location="cpu", weights_only=True)["meta"]["classes"]


def summarize(values: list[float]) -> dict:
    """min (as the paper reports FID over seed sets), max, mean and sample sd (None for a single set)."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"min": None, "max": None, "mean": None, "sd": None}
    return {"min": min(v), "max": max(v), "mean": float(np.mean(v)),
            "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None}
