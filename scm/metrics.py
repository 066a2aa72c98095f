"""Image-quality metrics (FID, KID, precision/recall, FD_DINOv2) through torch-fidelity.

- Every metric goes through `torch_fidelity.calculate_metrics`, generated images fed as a Dataset of
  uint8 CHW tensors (GenerativeModelModuleWrapper with classes crashes on numpy >= 1.24; stack-notes).
- Feature extractors: torch-fidelity's 'inception-v3-compat' (real datasets, weights from a local file),
  the project's own small CNN for the embedded 'shapes' set ('scm-shapes-v1', trained deterministically
  on first use) and EDM2's FD_DINOv2 preprocessing around a local DINOv2 file ('scm-dinov2-edm2').
- Reference statistics are named `{dataset}-{extractor}-{hash12}` where the hash covers the real images'
  bytes and the extractor's weights (torch-fidelity's own cache keys ignore content): mu/sigma (float64)
  go to `{name}.npz` (EDM's format) and torch-fidelity caches the real features under the same name.
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

SHAPES_EXTRACTOR = "scm-shapes-v1"
DINOV2_EXTRACTOR = "scm-dinov2-edm2"
INCEPTION_EXTRACTOR = "inception-v3-compat"
DEFAULT_SHAPES_EXTRACTOR_PATH = "results/artifacts/shapes-features-v1.pt"
DEFAULT_CACHE_DIR = "results/cache/ref-stats"
REF_STATS_VERSION = 1  # bump when the naming or the statistics change meaning
SHAPES_EXTRACTOR_VERSION = 1


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
# The 'shapes' feature network: a small CNN classifier trained by the project on the embedded set
# (fixed seed, one thread, fixed steps; ~25 s on one core). Features = the 128-d average-pooled
# activations before the classifier, as Inception's pool3 before its logits.


class ShapesFeatureNet(torch.nn.Module):
    def __init__(self, channels=(32, 64, 128), num_classes: int = 8):
        super().__init__()
        c1, c2, c3 = channels
        conv = lambda a, b: torch.nn.Conv2d(a, b, 3, padding=1)
        self.body = torch.nn.Sequential(
            conv(3, c1), torch.nn.ReLU(), conv(c1, c1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            conv(c1, c2), torch.nn.ReLU(), torch.nn.MaxPool2d(2), conv(c2, c3), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(c3, num_classes)
        # Set after training so that real features have unit RMS (FID/KID on an Inception-like scale).
        self.register_buffer("feature_scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] (B, 3, H, W) -> (features (B, c3) scaled by feature_scale, logits (B, classes))."""
        f = self.body(x)
        return f * self.feature_scale, self.head(f)


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


def train_shapes_extractor(path=DEFAULT_SHAPES_EXTRACTOR_PATH, steps: int = 500, batch: int = 128,
                           lr: float = 3e-3, seed: int = 0, train_images: int = 8192,
                           test_images: int = 2048, resolution: int = 16) -> dict:
    """Train the shapes classifier and save {version, state_dict, meta} atomically; returns meta
    (test accuracy on a held-out set drawn with another seed, settings, torch version, seconds)."""
    from scm.data import SHAPE_CLASSES, generate_shapes

    t0 = time.time()
    # Train and test sets with their own seeds (runs train on seed 0: none of these images).
    xtr, ytr = (torch.from_numpy(a) for a in generate_shapes(train_images, resolution, seed=1001))
    xte, yte = (torch.from_numpy(a) for a in generate_shapes(test_images, resolution, seed=1002))
    xtr = xtr.float() / 127.5 - 1
    with _one_thread_seeded(seed):
        net = ShapesFeatureNet(num_classes=len(SHAPE_CLASSES))
        opt = torch.optim.Adam(net.parameters(), lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
        g = torch.Generator().manual_seed(seed)
        # Random batches with horizontal flips (every class is symmetric under them).
        for _ in range(steps):
            idx = torch.randint(len(xtr), (batch,), generator=g)
            flip = (torch.rand(batch, generator=g) < 0.5)[:, None, None, None]
            x = torch.where(flip, xtr[idx].flip(-1), xtr[idx])
            loss = F.cross_entropy(net(x)[1], ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            acc = float((net(xte.float() / 127.5 - 1)[1].argmax(1) == yte).float().mean())
            rms = float(torch.cat([net(x)[0] for x in xtr.split(1024)]).square().mean().sqrt())
            net.feature_scale.fill_(1.0 / rms)
    meta = {"name": SHAPES_EXTRACTOR, "version": SHAPES_EXTRACTOR_VERSION, "test_accuracy": acc,
            "test_images": test_images, "train_images": train_images, "steps": steps, "batch": batch,
            "lr": lr, "seed": seed, "resolution": resolution, "feature_dim": net.head.in_features,
            "feature_scale": 1.0 / rms,
            "classes": list(SHAPE_CLASSES), "final_loss": float(loss.detach()), "torch": str(torch.__version__)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # No timings or file names in the bytes (torch.save to a path embeds its stem): the same training gives
    # the same file, hence the same reference names.
    buf = io.BytesIO()
    torch.save({"version": SHAPES_EXTRACTOR_VERSION, "state_dict": net.state_dict(), "meta": meta}, buf)
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    seconds = round(time.time() - t0, 2)
    log.info("shapes feature extractor: test accuracy %.4f, %.1f s -> %s", acc, seconds, path)
    return {**meta, "train_seconds": seconds}


def ensure_shapes_extractor(path=None) -> Path:
    """The artifact at `path` (default DEFAULT_SHAPES_EXTRACTOR_PATH), trained first if missing."""
    path = Path(path or DEFAULT_SHAPES_EXTRACTOR_PATH)
    if not path.exists():
        log.info("shapes feature extractor %s missing: training it (deterministic, ~30 s)", path)
        train_shapes_extractor(path)
    return path


def load_shapes_extractor(path) -> tuple[ShapesFeatureNet, dict]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != SHAPES_EXTRACTOR_VERSION:
        raise ValueError(f"{path}: shapes extractor version {state.get('version')}, expected "
                         f"{SHAPES_EXTRACTOR_VERSION}; delete it to retrain")
    net = ShapesFeatureNet(num_classes=len(state["meta"]["classes"]))
    net.load_state_dict(state["state_dict"])
    return net.eval().requires_grad_(False), state["meta"]


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


def resolve_weights(extractor: str, weights_path=None) -> Path:
    """The local weights file of `extractor`; the shapes network is trained if missing, others are errors."""
    if extractor == SHAPES_EXTRACTOR:
        return ensure_shapes_extractor(weights_path)
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
        info["extractor_accuracy"] = torch.load(weights_path, map_location="cpu",
                                                weights_only=True)["meta"]["test_accuracy"]
    return info


# ----------------------------------------------------------------------------
# Metrics. Real images: one calculate_metrics call per generated set; torch-fidelity caches the real
# features under our content-hashed name. Imported statistics (no real images): FD from features.


@dataclass
class Reference:
    """Real images (uint8) or imported statistics, with the extractor that compares against them."""

    dataset: str
    extractor: str
    weights_path: Path
    cache_dir: Path
    images: torch.Tensor | None = None
    stats_path: Path | None = None  # imported .npz/.pkl when there are no images

    @functools.cached_property
    def name(self) -> str:
        if self.images is None:
            return Path(self.stats_path).stem
        return f"{self.dataset}-{self.extractor}-" + content_hash(self.images, self.extractor,
                                                                 file_fingerprint(self.weights_path))


def make_reference(dataset: str, images: torch.Tensor | None = None, extractor: str | None = None,
                   weights_path=None, cache_dir=DEFAULT_CACHE_DIR, stats_path=None) -> Reference:
    if images is None and stats_path is None:
        raise NoReferenceError(f"{dataset}: no real images to compare against; pass reference statistics "
                              "(EDM .npz or EDM2 .pkl) with --ref-stats")
    extractor = extractor or default_extractor(dataset)
    register_extractors()
    return Reference(dataset, extractor, resolve_weights(extractor, weights_path), Path(cache_dir),
                     images, Path(stats_path) if stats_path else None)


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


def compute_metrics(generated: torch.Tensor, ref: Reference, kid: bool = True, prc: bool = True,
                    device: str = "cpu", batch_size: int = 256, kid_subsets: int = 100) -> dict:
    """{fid, kid, kid_sd, precision, recall} of uint8 `generated` against `ref` (None where unavailable)."""
    if ref.images is None:
        # Imported statistics: FD from our float64 statistics of the generated features.
        mu, sigma, _ = reference_stats(ref, device, batch_size)
        g_mu, g_sigma = feature_statistics(extract_features(generated, ref, device, batch_size))
        return {"fid": frechet_distance(g_mu, g_sigma, mu, sigma), "kid": None, "kid_sd": None,
                "precision": None, "recall": None}
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
            "recall": get(torch_fidelity.KEY_METRIC_RECALL)}


def summarize(values: list[float]) -> dict:
    """min (as the paper reports over seed sets), mean and sample sd (None for a single set)."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"min": None, "mean": None, "sd": None}
    return {"min": min(v), "mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None}
