"""The embedded `shapes` dataset's renderer: 8 classes drawn with numpy, the same bytes on every machine.

Versions (data.shapes_version) are entries of SHAPES_VERSIONS, each pinned by its checksum in the unit
tests; scm.data.ShapesDataset serves the images to training, scm.metrics trains its feature network on them.
"""

from __future__ import annotations

import math

import numpy as np

from scm.config import ConfigError

# ----------------------------------------------------------------------------
# The embedded "shapes" set: 8 classes drawn with numpy, 4x4 supersampled for anti-aliased edges.
# Only +, -, *, /, sqrt, floor and comparisons are used (IEEE-exact everywhere; no sin/cos from libm),
# coverage is an integer count, and pixels are quantized to uint8: the bytes are the same on every machine.
# A drawing change is a new entry of SHAPES_VERSIONS (the unit tests pin each version's checksum);
# SHAPES_VERSION is the default (data.shapes_version selects another; the default study uses 2).

SHAPES_VERSION = 1
SHAPE_CLASSES = ("circle", "square", "triangle", "plus", "ring", "stripes", "bar", "diamond")
_SUPERSAMPLE = 4
_SQRT3_2 = math.sqrt(3.0) / 2

# Per class: size range, max |tan(angle / 2)| of the rotation, any turn (sign flip), extent (x, y) / size.
# Squares, diamonds and bars rotate little so that they stay unlike each other; stripes fill the image.
_SHAPE_SPECS = {
    "circle": ((0.40, 0.75), 0.0, False, (1.0, 1.0)),
    "square": ((0.35, 0.60), 0.13, False, (1.42, 1.42)),
    "triangle": ((0.55, 0.90), 1.0, True, (1.0, 1.0)),
    "plus": ((0.50, 0.85), 0.18, False, (1.05, 1.05)),
    "ring": ((0.50, 0.85), 0.0, False, (1.0, 1.0)),
    "stripes": ((0.40, 0.60), 0.09, False, (0.0, 0.0)),
    "bar": ((0.55, 0.85), 0.09, False, (0.5, 1.0)),
    "diamond": ((0.50, 0.85), 0.09, False, (0.85, 1.0)),
}


def _inside(name: str, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean mask of shape `name` with size r in its own frame (u right, v down)."""
    a, b = np.abs(u), np.abs(v)
    if name == "circle":
        return u * u + v * v <= r * r
    if name == "square":
        return np.maximum(a, b) <= r
    if name == "triangle":  # equilateral, circumradius r, apex up: three half-planes at inradius r/2
        return (v <= r / 2) & (-_SQRT3_2 * u - 0.5 * v <= r / 2) & (_SQRT3_2 * u - 0.5 * v <= r / 2)
    if name == "plus":
        w = 0.28 * r
        return ((a <= w) & (b <= r)) | ((b <= w) & (a <= r))
    if name == "ring":
        rr = u * u + v * v
        return (rr <= r * r) & (rr >= (0.55 * r) * (0.55 * r))
    if name == "stripes":  # horizontal stripes of period r
        return np.floor(v / r) % 2 == 0
    if name == "bar":  # one upright bar, 3 times taller than wide
        return (a <= 0.33 * r) & (b <= r)
    if name == "diamond":  # a rhombus taller than wide (a rotated square would be a square)
        return a / 0.7 + b <= r
    raise ValueError(f"unknown shape {name!r}")


def _turn(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of the angle 2 atan(t), by the rational parametrization (exact arithmetic only)."""
    d = 1.0 + t * t
    return (1.0 - t * t) / d, 2.0 * t / d


def _coverage(name: str, r, cx, cy, c, s, resolution: int) -> np.ndarray:
    """Alpha (n, 1, H, W) of shape `name`: supersample centres in [-1, 1], rotated into the shape's
    frame (cos c, sin s) around (cx, cy), hits counted per pixel."""
    n, ss = len(cx), _SUPERSAMPLE * resolution
    g = (2 * np.arange(ss) + 1) / ss - 1
    dx = g[None, None, :] - cx[:, None, None]
    dy = g[None, :, None] - cy[:, None, None]
    c, s = c[:, None, None], s[:, None, None]
    hit = _inside(name, c * dx + s * dy, c * dy - s * dx, r)
    hits = hit.reshape(n, resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).sum(axis=(2, 4))
    return (hits / _SUPERSAMPLE**2)[:, None]


def _draw(name: str, q: np.ndarray, resolution: int) -> np.ndarray:
    """Images (n, 3, H, W) in [0, 1] of one class from uniform parameters q (n, 18)."""
    (lo, hi), tmax, any_turn, (ex, ey) = _SHAPE_SPECS[name]
    r = (lo + (hi - lo) * q[:, 0])[:, None, None]
    # Position: anywhere the shape still fits (extent x size from the centre, 0.95 from the border).
    cx = (2 * q[:, 1] - 1) * np.maximum(0.95 - ex * r[:, 0, 0], 0.0)
    cy = (2 * q[:, 2] - 1) * np.maximum(0.95 - ey * r[:, 0, 0], 0.0)
    c, s = _turn(tmax * (2 * q[:, 3] - 1))
    if any_turn:  # the other half turn
        flip = np.where(q[:, 4] < 0.5, -1.0, 1.0)
        c, s = c * flip, s * flip
    alpha = _coverage(name, r, cx, cy, c, s, resolution)
    # Colours: light on dark or dark on light, so that the shape always stands out.
    dark_bg = (q[:, 5] < 0.5)[:, None]
    fg = np.where(dark_bg, 0.6, 0.0) + 0.4 * q[:, 6:9]
    bg0 = np.where(dark_bg, 0.0, 0.6) + 0.4 * q[:, 9:12]
    bg1 = np.where(dark_bg, 0.0, 0.6) + 0.4 * q[:, 12:15]
    # Background: a soft linear gradient bg0 -> bg1 along a random direction.
    gc, gs = _turn(2 * q[:, 15] - 1)
    gflip = np.where(q[:, 16] < 0.5, -1.0, 1.0)
    p = (2 * np.arange(resolution) + 1) / resolution - 1
    gx, gy = (gc * gflip)[:, None, None], (gs * gflip)[:, None, None]
    ramp = 0.5 + 0.35 * (gx * p[None, None, :] + gy * p[None, :, None])
    bg = bg0[:, :, None, None] + (bg1 - bg0)[:, :, None, None] * ramp[:, None]
    return bg * (1 - alpha) + fg[:, :, None, None] * alpha


# Version 2: the same 8 shapes with fewer nuisance factors, learnable by a CPU-sized model in a few hundred
# steps (version 1's continuous colours and gradients were not). Large shapes near the centre, small
# rotations (triangles point up or down), one of 6 bright colours (q column 6) on a flat dark background.
_SHAPE_SPECS_V2 = {
    "circle": ((0.60, 0.80), 0.0, False, (1.0, 1.0)),
    "square": ((0.50, 0.62), 0.09, False, (1.42, 1.42)),
    "triangle": ((0.75, 0.95), 0.09, True, (1.0, 1.0)),
    "plus": ((0.70, 0.90), 0.09, False, (1.05, 1.05)),
    "ring": ((0.65, 0.85), 0.0, False, (1.0, 1.0)),
    "stripes": ((0.40, 0.55), 0.05, False, (0.0, 0.0)),
    "bar": ((0.75, 0.90), 0.05, False, (0.5, 1.0)),
    "diamond": ((0.75, 0.90), 0.05, False, (0.85, 1.0)),
}
_PALETTE_V2 = np.array([[1.0, 0.25, 0.2], [0.3, 0.9, 0.3], [0.3, 0.45, 1.0],
                        [1.0, 0.9, 0.25], [0.25, 0.9, 0.95], [0.95, 0.35, 0.95]])
_BACKGROUND_V2 = np.array([0.08, 0.08, 0.1])


def _draw_v2(name: str, q: np.ndarray, resolution: int) -> np.ndarray:
    """Version 2 of _draw: images (n, 3, H, W) in [0, 1] from uniforms q (n, 18); columns 0-4 and 6 used."""
    (lo, hi), tmax, any_turn, (ex, ey) = _SHAPE_SPECS_V2[name]
    r = (lo + (hi - lo) * q[:, 0])[:, None, None]
    # Position: at most 0.12 (about 1 pixel at 16x16) from the centre, and only where the shape fits.
    cx = (2 * q[:, 1] - 1) * np.minimum(np.maximum(0.95 - ex * r[:, 0, 0], 0.0), 0.12)
    cy = (2 * q[:, 2] - 1) * np.minimum(np.maximum(0.95 - ey * r[:, 0, 0], 0.0), 0.12)
    c, s = _turn(tmax * (2 * q[:, 3] - 1))
    if any_turn:  # point up or down
        flip = np.where(q[:, 4] < 0.5, -1.0, 1.0)
        c, s = c * flip, s * flip
    n = len(q)
    alpha = _coverage(name, r, cx, cy, c, s, resolution)
    fg = _PALETTE_V2[np.minimum(np.floor(q[:, 6] * len(_PALETTE_V2)).astype(np.int64), len(_PALETTE_V2) - 1)]
    bg = np.broadcast_to(_BACKGROUND_V2[None, :, None, None], (n, 3, resolution, resolution))
    return bg * (1 - alpha) + fg[:, :, None, None] * alpha


# version -> drawing function (name, q, resolution) -> images in [0, 1]; every version keeps its bytes.
SHAPES_VERSIONS = {1: _draw, 2: _draw_v2}


def generate_shapes(num_images: int, resolution: int = 16, seed: int = 0, version: int = SHAPES_VERSION,
                    return_factors: bool = False):
    """(images uint8 (N, 3, H, W), labels int64 (N,)), plus the factors q (N, 18) if return_factors.

    Image i is of class i % 8 and depends only on (seed, i, resolution, version). The factors are the
    18 uniforms in [0, 1) the image was drawn from (size, position, rotation, colours, background).
    """
    if version not in SHAPES_VERSIONS:
        raise ConfigError(f"data.shapes_version: unknown version {version}; choose one of {sorted(SHAPES_VERSIONS)}")
    draw = SHAPES_VERSIONS[version]
    # One row of uniforms per image, drawn in one call: the first M rows do not depend on N.
    q = np.random.default_rng([seed, version]).random((num_images, 18))
    labels = np.arange(num_images, dtype=np.int64) % len(SHAPE_CLASSES)
    images = np.empty((num_images, 3, resolution, resolution), dtype=np.uint8)
    # Draw in chunks of images, class by class, to bound the memory of the supersampled grids.
    for start in range(0, num_images, 1024):
        for k, name in enumerate(SHAPE_CLASSES):
            idx = start + np.flatnonzero(labels[start:start + 1024] == k)
            if len(idx):
                images[idx] = np.floor(draw(name, q[idx], resolution) * 255 + 0.5).astype(np.uint8)
    return (images, labels, q) if return_factors else (images, labels)
