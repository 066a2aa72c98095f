"""scm.data: the embedded shapes set, EDM2 ZIPs, CIFAR-10 errors, build_dataset, the resumable loader."""

import hashlib

import numpy as np
import PIL.Image
import pytest
import torch

from scm.config import ConfigError, DataConfig
from scm.data import (
    Cifar10Dataset,
    GMMDataset,
    InfiniteLoader,
    ShapesDataset,
    ZipDataset,
    build_dataset,
    save_image_grid,
    write_edm_zip,
)
from scm.shapes import SHAPE_CLASSES, generate_shapes

# Pinned bytes of the shapes set (SHAPES_VERSION 1): a drawing change must bump the version and these.
SHAPES_SHA256_256x16 = "a79dcae2ca939bf077c4d8f1c6d0137af1dbb3cafda11fe09ef758f2785c5eb1"
SHAPES_SHA256_64x32 = "1f6d45b262efab05826c7fa107f0a7ea6d59b55ac090999bf0262e1bc36d4ae9"


# ----------------------------------------------------------------------------
# Shapes.


def test_shapes_deterministic_and_pinned():
    a, la = generate_shapes(256, 16, seed=0)
    b, lb = generate_shapes(256, 16, seed=0)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert hashlib.sha256(a.tobytes()).hexdigest() == SHAPES_SHA256_256x16
    assert hashlib.sha256(generate_shapes(64, 32)[0].tobytes()).hexdigest() == SHAPES_SHA256_64x32
    # Image i does not depend on how many images are generated; another seed gives other images.
    assert np.array_equal(generate_shapes(40, 16)[0], a[:40])
    assert not np.array_equal(generate_shapes(40, 16, seed=1)[0], a[:40])


# Pinned bytes of renderer version 2 (fewer nuisance factors; the default study's data).
SHAPES_V2_SHA256_256x16 = "964dc798275da0db7fc7ea400982cce1edc16ac32d314b479c84cbf7ae7de05b"
SHAPES_V2_SHA256_64x32 = "4611902e797c6ce7fe4bdf1e311cd90e30608d0468f11cfa4710d14c069067a6"


def test_shapes_v2_pinned_and_simpler():
    a, la = generate_shapes(256, 16, seed=0, version=2)
    assert hashlib.sha256(a.tobytes()).hexdigest() == SHAPES_V2_SHA256_256x16
    assert hashlib.sha256(generate_shapes(64, 32, version=2)[0].tobytes()).hexdigest() == SHAPES_V2_SHA256_64x32
    assert np.array_equal(la, np.arange(256) % 8)
    # Version 1's bytes are untouched by version 2, and the two versions differ.
    assert hashlib.sha256(generate_shapes(256, 16, seed=0)[0].tobytes()).hexdigest() == SHAPES_SHA256_256x16
    assert not np.array_equal(generate_shapes(256, 16, seed=0)[0], a)
    # Flat background: the corner pixel is the same dark colour (0.08, 0.08, 0.1) x 255 in every image.
    assert np.array_equal(np.unique(a[:, :, 0, 0].reshape(256, 3)[la != 5], axis=0), [[20, 20, 26]])
    # At most 6 foreground colours: the brightest pixel of each image is one of the palette's.
    flat = a.reshape(256, 3, -1)
    brightest = flat[np.arange(256), :, flat.sum(1).argmax(1)]
    assert len(np.unique(brightest, axis=0)) <= 6


def test_shapes_dataset_distinct_balanced_in_range():
    ds = ShapesDataset(2048, 16)
    assert len(ds) == 2048 and ds.shape == (3, 16, 16)
    assert len({img.numpy().tobytes() for img in ds.data}) >= 1000
    counts = torch.bincount(ds.labels, minlength=len(SHAPE_CLASSES))
    assert len(counts) == 8 and counts.min() >= 200
    x, y = ds[5]
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16) and y.dtype == torch.int64 and int(y) == 5
    xs = ds.get_batch(torch.arange(2048))[0]
    assert xs.min() >= -1 and xs.max() <= 1
    # Images, not flat fields: every one has a visible shape on its background.
    assert xs.flatten(1).std(1).min() > 0.05
    assert ShapesDataset(16, 32).shape == (3, 32, 32)


# ----------------------------------------------------------------------------
# EDM2 ZIPs.


def test_zip_images_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, size=12)
    names = write_edm_zip(tmp_path / "ds.zip", images, labels)
    assert names[0] == "00000/img00000000.png"
    ds = ZipDataset(tmp_path / "ds.zip")
    assert len(ds) == 12 and ds.shape == (3, 8, 8) and not ds.latents
    for i in range(12):
        x, y = ds[i]
        pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(pixels, images[i]) and int(y) == labels[i]
    # Without labels in dataset.json, every label is -1.
    write_edm_zip(tmp_path / "nolabels.zip", images[:, :, :, :1])
    unlabeled = ZipDataset(tmp_path / "nolabels.zip")
    assert unlabeled.shape == (1, 8, 8) and (unlabeled.labels == -1).all()


def test_zip_latents_mean_std(tmp_path):
    C, mean, std = 4, np.array([1.5, -0.7, 0.5, 0.7]), np.array([5.0, 6.0, 4.0, 4.5])
    # Entries with std = 0 are exactly their mean: normalized to (mean - latent_mean) / latent_std * sigma_d.
    mu = np.random.default_rng(1).normal(size=(3, C, 4, 4)).astype(np.float32) * 3
    write_edm_zip(tmp_path / "lat0.zip", np.concatenate([mu, np.zeros_like(mu)], axis=1), [0, 1, 2])
    ds = ZipDataset(tmp_path / "lat0.zip", mean, std, sigma_d=0.5)
    assert ds.latents and ds.shape == (C, 4, 4)
    expect = (mu[1] - mean[:, None, None]) / std[:, None, None] * 0.5
    assert np.allclose(ds[1][0].numpy(), expect, atol=1e-6) and int(ds[1][1]) == 1
    # mean = latent_mean, std = latent_std: items are sigma_d * N(0, 1), fixed per (idx, epoch).
    n = 4
    stats = np.concatenate([np.broadcast_to(mean[:, None, None], (C, 16, 16)),
                            np.broadcast_to(std[:, None, None], (C, 16, 16))])
    write_edm_zip(tmp_path / "lat.zip", np.stack([stats] * n).astype(np.float32))
    ds = ZipDataset(tmp_path / "lat.zip", mean, std, sigma_d=0.5)
    z = torch.stack([ds.get(i, epoch=0)[0] for i in range(n)])
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 0.5) < 0.05
    assert torch.equal(ds.get(2, 0)[0], z[2]) and not torch.equal(ds.get(2, 1)[0], z[2])


# ----------------------------------------------------------------------------
# CIFAR-10 and build_dataset.


def test_cifar10_missing_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="scm data fetch cifar10"):
        Cifar10Dataset(str(tmp_path))
    cfg = DataConfig(name="cifar10", path=str(tmp_path), resolution=32)
    with pytest.raises(FileNotFoundError, match="data.path.*scm data fetch cifar10"):
        build_dataset(cfg, 0.5)


def test_build_dataset_embedded():
    ds = build_dataset(DataConfig(num_images=64), 0.5)
    assert isinstance(ds, ShapesDataset) and len(ds) == 64 and ds.labels.max() == 7
    gmm = build_dataset(DataConfig(name="gmm", resolution=4, channels=1, label_dim=0, num_images=4096), 0.5)
    assert isinstance(gmm, GMMDataset) and gmm.shape == (1, 4, 4)
    assert gmm.means.shape == (8, 16) and gmm.stds.shape == (8,) and gmm.weights.shape == (8,)
    assert abs(float(gmm.weights.sum()) - 1) < 1e-12
    x, y = gmm.get_batch(torch.arange(4096))
    assert x.shape == (4096, 1, 4, 4) and (y == -1).all()
    assert abs(float(x.pow(2).mean().sqrt()) - 0.5) < 0.03
    # Each epoch is a fresh, reproducible draw.
    assert not torch.equal(gmm.get_batch(torch.arange(8), 1)[0], x[:8])
    assert torch.equal(gmm.get_batch(torch.arange(8), 0)[0], x[:8])


def test_build_dataset_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.name"):
        build_dataset(DataConfig(name="mnist"), 0.5)
    with pytest.raises(ConfigError, match="data.path"):
        build_dataset(DataConfig(name="zip"), 0.5)
    with pytest.raises(FileNotFoundError, match="data.path.*not found"):
        build_dataset(DataConfig(name="imagenet64", path=str(tmp_path / "missing.zip")), 0.5)
    write_edm_zip(tmp_path / "ds.zip", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match="data.resolution"):
        build_dataset(DataConfig(name="zip", path=str(tmp_path / "ds.zip"), resolution=16, label_dim=0), 0.5)
    with pytest.raises(ConfigError, match="data.label_dim"):
        build_dataset(DataConfig(name="zip", path=str(tmp_path / "ds.zip"), resolution=8, label_dim=10), 0.5)
    write_edm_zip(tmp_path / "lat.zip", np.zeros((2, 8, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="data.latent_mean"):
        build_dataset(DataConfig(name="zip", path=str(tmp_path / "lat.zip"), resolution=8, channels=4,
                                 label_dim=0), 0.5)


# ----------------------------------------------------------------------------
# The loader.


class IndexDataset(torch.utils.data.Dataset):
    """Item i is a 1x2x2 image of i (no get_batch: exercises the per-item path)."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(i)), i


def test_loader_resume_matches_uninterrupted():
    ds = ShapesDataset(64, 16)
    # 24 does not divide 64: batches cross epoch boundaries.
    uninterrupted = InfiniteLoader(ds, 24, seed=3, xflip=True)
    reference = [next(uninterrupted) for _ in range(10)]
    loader = InfiniteLoader(ds, 24, seed=3, xflip=True)
    for _ in range(4):
        next(loader)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["position"] == 32
    resumed = InfiniteLoader(ds, 24, seed=3, xflip=True)
    resumed.load_state_dict(state)
    for k in range(4, 10):
        x, y = next(resumed)
        assert torch.equal(x, reference[k][0]) and torch.equal(y, reference[k][1])
    with pytest.raises(ValueError, match="seed"):
        InfiniteLoader(ds, 24, seed=4).load_state_dict(state)


def test_loader_xflip_flips_some_items():
    ds = ShapesDataset(64, 16)
    x0, _ = next(InfiniteLoader(ds, 64, seed=0))
    x1, _ = next(InfiniteLoader(ds, 64, seed=0, xflip=True))
    flipped = [torch.equal(a.flip(-1), b) and not torch.equal(a, b) for a, b in zip(x0, x1, strict=True)]
    same = [torch.equal(a, b) for a, b in zip(x0, x1, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True)) and 16 < sum(flipped) < 48


def test_loader_ranks_disjoint_and_covering():
    ds, world = IndexDataset(), 4
    whole = InfiniteLoader(ds, 20, seed=1)
    ranks = [InfiniteLoader(ds, 20, seed=1, rank=r, world_size=world) for r in range(world)]
    seen = []
    for _ in range(2):  # one epoch: 2 global batches of 20
        parts = [next(r) for r in ranks]
        x, y = next(whole)
        assert all(p[0].shape[0] == 5 for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        seen += y.tolist()
    assert sorted(seen) == list(range(40))
    assert torch.equal(x[:, 0, 0, 0].long(), y)
    # The next epoch is another permutation.
    assert next(whole)[1].tolist() != seen[:20]


def test_loader_workers_match_in_process(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, size=(10, 4, 4, 3), dtype=np.uint8)
    write_edm_zip(tmp_path / "ds.zip", images, list(range(10)))
    ds = ZipDataset(tmp_path / "ds.zip")
    inline = InfiniteLoader(ds, 4, seed=0, xflip=True)
    workers = InfiniteLoader(ds, 4, seed=0, xflip=True, num_workers=1)
    for _ in range(4):
        (xa, ya), (xb, yb) = next(inline), next(workers)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert workers.state_dict() == inline.state_dict()


# ----------------------------------------------------------------------------
# Grids.


def test_save_image_grid(tmp_path):
    x = ShapesDataset(10, 16).get_batch(torch.arange(10))[0]
    save_image_grid(x, tmp_path / "grid.png", nrow=5, scale=1, pad=0)
    grid = np.array(PIL.Image.open(tmp_path / "grid.png"))
    assert grid.shape == (32, 80, 3)
    assert np.array_equal(grid[16:32, 16:32], ((x[6] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    save_image_grid(x, tmp_path / "big.png")  # default: 4x upscaled, 1-pixel gaps
    assert PIL.Image.open(tmp_path / "big.png").size == (4 * (4 * 17 + 1), 4 * (3 * 17 + 1))
