"""Image-quality metrics (FID, KID, precision/recall, FD_DINOv2) through torch-fidelity.

- Every metric goes through `torch_fidelity.calculate_metrics`, generated images fed as a Dataset of
  uint8 CHW tensors (GenerativeModelModuleWrapper with classes crashes on numpy >= 1.24).
- Feature extractors (scm.extractors): torch-fidelity's 'inception-v3-compat' (real datasets), the
  project's own 'scm-shapes-v3' for the embedded set, EDM2's FD_DINOv2 preprocessing ('scm-dinov2-edm2').
- Class-aware metrics of conditional samples (shapes): class accuracy (the extractor's classifier) and the
  Fréchet joint distance of (features, label) (DeVries et al. 2019). Calibration: scm.calibration.
- Reference statistics are named `{dataset}[-data{shapes version}]-{extractor}-{hash12}` where the hash
  covers the real images' bytes and the extractor's weights (torch-fidelity's own cache keys ignore
  content): mu/sigma (float64) go to `{name}.npz` (EDM's format) and torch-fidelity caches the real
  features under the same name.
- Nothing here downloads.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scm.config import REF_STATS_DIR
from scm.extractors import (
    DINOV2_EXTRACTOR,
    SHAPES_EXTRACTOR,
    default_extractor,
    load_shapes_extractor,
    register_extractors,
    resolve_weights,
)
from scm.fileio import file_fingerprint

log = logging.getLogger(__name__)

REF_STATS_VERSION = 1  # bump when the naming or the statistics change meaning


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
# Content hashes of image bytes (weight files: scm.fileio.file_fingerprint).

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
                   weights_path=None, cache_dir=REF_STATS_DIR, stats_path=None, labels=None,
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
