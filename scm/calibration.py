"""Calibration of the shapes metrics: what FID, FJD and class accuracy say about images a person can judge.

Real shapes from seeds disjoint from the reference give the floor (two finite samples of one distribution);
degraded real shapes and, optionally, a run's samples show how far the metrics move. Every row is computed
on `num` images per seed set (the study's sample count) against the study's reference set (seed 0, the
images runs train on), with mean, sd, min and max over seed sets. `scm data calibrate` writes the table
that docs/metrics.md shows; tests/unit/test_metrics.py checks its ordering.

Degradations act on uint8 images as floats in [0, 1] (sigma and shifts are fractions of the pixel range):
Gaussian pixel noise, Gaussian blur (sigma in pixels), a colour shift (+d red, -d blue), wrong class
(each image paired with another class's label: only the class-aware metrics can see it), a flat background
(background pixels set to their mean: no gradient), a blank background (background pixels grey), the
background alone (no shape) and uniform noise.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scm import metrics
from scm.config import REF_STATS_DIR

log = logging.getLogger(__name__)

NOISE_SIGMAS = (0.02, 0.05, 0.1, 0.2)
BLUR_SIGMAS = (0.5, 1.0)
COLOUR_SHIFTS = (0.05, 0.1)


# ----------------------------------------------------------------------------
# Degradations (uint8 in, uint8 out; randomness from `seed` only).


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.double() / 255


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def gaussian_noise(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return _uint8(_float(x) + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, radius ceil(3 sigma), reflected borders."""
    radius = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).reshape(1, 1, -1)
    y = _float(x)
    n, c, h, w = y.shape
    rows = F.conv1d(F.pad(y.reshape(-1, 1, w), (radius, radius), mode="reflect"), k).reshape(n, c, h, w)
    cols = rows.transpose(2, 3).reshape(-1, 1, h)
    cols = F.conv1d(F.pad(cols, (radius, radius), mode="reflect"), k).reshape(n, c, w, h).transpose(2, 3)
    return _uint8(cols)


def colour_shift(x: torch.Tensor, delta: float) -> torch.Tensor:
    return _uint8(_float(x) + torch.tensor([delta, 0.0, -delta], dtype=torch.float64).reshape(1, 3, 1, 1))


def shape_mask(q: np.ndarray, labels: np.ndarray, resolution: int, version: int) -> torch.Tensor:
    """(N, 1, H, W) bool: the pixels a shape touches, found as the pixels that change when only the
    foreground colour (q columns 6-8) changes (renderer `version` redraws each image with 1 - q there)."""
    from scm.shapes import SHAPE_CLASSES, SHAPES_VERSIONS

    draw = SHAPES_VERSIONS[version]
    q2 = q.copy()
    q2[:, 6:9] = 1 - q2[:, 6:9]
    mask = np.zeros((len(q), 1, resolution, resolution), dtype=bool)
    for k, name in enumerate(SHAPE_CLASSES):
        idx = np.flatnonzero(labels == k)
        if len(idx):
            a, b = draw(name, q[idx], resolution), draw(name, q2[idx], resolution)
            mask[idx] = (np.abs(a - b) > 1e-9).any(axis=1, keepdims=True)
    return torch.from_numpy(mask)


def flat_background(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Background pixels set to their mean colour per image (no gradient); the shape unchanged."""
    y, bg = _float(x), (~mask).double()
    mean = (y * bg).sum((2, 3), keepdim=True) / bg.sum((2, 3), keepdim=True).clamp(min=1)
    return _uint8(torch.where(mask, y, mean))


def blank_background(x: torch.Tensor, mask: torch.Tensor, value: float = 0.5) -> torch.Tensor:
    """Background pixels set to one grey for every image (a blank canvas); the shape unchanged."""
    return _uint8(torch.where(mask, _float(x), value))


def background_only(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The shape removed: a plane a + b u + c v per channel fitted (least squares) to the background
    pixels, drawn everywhere (the shapes' backgrounds are linear ramps)."""
    y = _float(x)
    n, c, h, w = y.shape
    v, u = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64),
                          torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij")
    basis = torch.stack([torch.ones_like(u), u, v]).reshape(3, -1)  # (3, H W)
    out = torch.empty_like(y)
    for i in range(n):
        keep = ~mask[i, 0].reshape(-1)
        a = basis[:, keep].T  # (P, 3)
        coef = torch.linalg.lstsq(a, y[i].reshape(c, -1)[:, keep].T).solution  # (3, C)
        out[i] = (basis.T @ coef).T.reshape(c, h, w)
    return _uint8(out)


def uniform_noise(shape, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, tuple(shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def wrong_labels(labels: torch.Tensor, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Each label replaced by another class, uniform over the other num_classes - 1."""
    g = torch.Generator().manual_seed(seed)
    return (labels + torch.randint(1, num_classes, labels.shape, generator=g)) % num_classes


# ----------------------------------------------------------------------------
# The table.


def _cases(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, seed: int):
    """(name, images, labels) of every degradation of one real seed set."""
    yield "real, disjoint seeds (the floor)", x, y
    for s in NOISE_SIGMAS:
        yield f"Gaussian noise sigma={s}", gaussian_noise(x, s, seed), y
    for s in BLUR_SIGMAS:
        yield f"Gaussian blur sigma={s} px", gaussian_blur(x, s), y
    for d in COLOUR_SHIFTS:
        yield f"colour shift +-{d} (R+, B-)", colour_shift(x, d), y
    yield "wrong class (labels swapped)", x, wrong_labels(y, 8, seed)
    yield "flat background (gradient removed)", flat_background(x, mask), y
    yield "blank background (grey)", blank_background(x, mask), y
    yield "background only (no shape)", background_only(x, mask), y
    yield "uniform noise", uniform_noise(x.shape, seed), y


def calibrate(extractor_weights=None, shapes_version: int = 1, num: int = 512, ref_images: int = 2048,
              seed_sets: int = 3, runs: list[tuple[str, str, int]] | None = None, resolution: int = 16,
              cache_dir=REF_STATS_DIR, device: str = "cpu") -> list[dict]:
    """Rows {case, fid, fid_mean/sd/min/max, fjd_mean, class_accuracy_mean, ...} over `seed_sets` sets of
    `num` images (real set j: seed 2001 + j; disjoint from the reference (seed 0) and the extractor's
    images). `runs`: (label, run_dir, steps) whose EMA samples (seeds j num ...) become rows too."""
    from scm.shapes import generate_shapes

    images, labels = (torch.from_numpy(a) for a in generate_shapes(ref_images, resolution, 0, shapes_version))
    ref = metrics.make_reference("shapes", images, None, extractor_weights, cache_dir, labels=labels,
                                 shapes_version=shapes_version)
    metrics.reference_stats(ref, device)
    per_case: dict[str, list[dict]] = {}
    for j in range(seed_sets):
        x, y, q = generate_shapes(num, resolution, 2001 + j, shapes_version, return_factors=True)
        mask = shape_mask(q, y, resolution, shapes_version)
        for name, xs, ys in _cases(torch.from_numpy(x), torch.from_numpy(y), mask, seed=j):
            m = metrics.compute_metrics(xs, ref, kid=False, prc=False, device=device, labels=ys)
            per_case.setdefault(name, []).append(m)
        for label, run_dir, steps in runs or []:
            per_case.setdefault(f"{label} ({steps} steps)", []).append(
                _run_metrics(run_dir, steps, list(range(j * num, (j + 1) * num)), ref, device))
    rows = []
    for name, ms in per_case.items():
        row = {"case": name, "num": num, "seed_sets": seed_sets}
        for key in ("fid", "fjd", "class_accuracy"):
            vals = [m[key] for m in ms]
            row[key] = vals
            row.update({f"{key}_{k}": v for k, v in metrics.summarize(vals).items()})
        rows.append(row)
    floor = rows[0]["fid_mean"]
    for row in rows:
        row["fid_over_floor"] = row["fid_mean"] / floor if floor else None
    log.info("calibration: %d cases x %d seed sets, extractor %s", len(rows), seed_sets, ref.weights_path)
    return rows


def _run_metrics(run_dir, steps: int, seeds: list[int], ref: metrics.Reference, device: str) -> dict:
    from scm import evaluate
    from scm.train import load_final

    net, cfg = load_final(Path(run_dir), "ema", device)
    gen, _ = evaluate.generate(net, cfg, seeds, steps, device=device)
    labels = evaluate.seed_labels(cfg, seeds)
    return metrics.compute_metrics(gen, ref, kid=False, prc=False, device=device, labels=labels)


def markdown_table(rows: list[dict]) -> str:
    """The calibration table as markdown: mean +- sd [min, max] over seed sets, and FID / floor."""
    def cell(row, key, digits):
        if row[f"{key}_mean"] is None:
            return "-"
        sd = "" if row[f"{key}_sd"] is None else f" ± {row[f'{key}_sd']:.{digits}f}"
        return f"{row[f'{key}_mean']:.{digits}f}{sd} [{row[f'{key}_min']:.{digits}f}, {row[f'{key}_max']:.{digits}f}]"

    lines = ["| case | FID | FID / floor | FJD | class accuracy |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {cell(r, 'fid', 3)} | {r['fid_over_floor']:.1f} | {cell(r, 'fjd', 3)} | "
                     f"{cell(r, 'class_accuracy', 3)} |")
    return "\n".join(lines) + "\n"
