"""Datasets and the resumable batch loader.

Every dataset returns `(x, label)`: x float32 CHW, label an int64 scalar tensor.
- Pixels (shapes, CIFAR-10, EDM2 image ZIPs) are uint8 mapped to [-1, 1] as in EDM2 (u / 127.5 - 1);
  their std is about 0.5, the paper's sigma_d, so sigma_d does not rescale them.
- Latents (EDM2 `img-mean-std-*.npy`) are drawn as mean + std * noise and normalized per channel to
  (z - latent_mean) / latent_std * sigma_d, EDM2's final_std = 0.5 = sigma_d convention.
- The GMM has overall per-dimension std sigma_d.
- Unlabeled data (and any dataset when data.label_dim = 0) has label -1: never a valid class index,
  so code that wrongly uses it as one fails instead of silently training on class 0.

Datasets also offer `get(idx, epoch)`: randomness drawn at load time (latent noise, GMM samples) is a
function of (seed, epoch, idx), so a resumed run sees exactly the data an uninterrupted one sees.
In-memory datasets offer `get_batch(indices, epoch)`, which InfiniteLoader uses instead of items.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import zipfile

import numpy as np
import PIL.Image
import torch

from scm.config import ConfigError, DataConfig
from scm.shapes import SHAPE_CLASSES, SHAPES_VERSION, generate_shapes

LOGGER = logging.getLogger(__name__)

# ----------------------------------------------------------------------------
# In-memory datasets: the whole set is one tensor, batches are one indexing operation.


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (EDM2's StandardRGBEncoder); float data unchanged."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()


class _InMemoryDataset(torch.utils.data.Dataset):
    def __init__(self, data: torch.Tensor, labels: torch.Tensor):
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return len(self.data)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[1:])

    def get_batch(self, indices: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return _to_float(self.data[indices]), self.labels[indices]

    def get(self, idx: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([idx]), epoch)
        return x[0], y[0]

    def __getitem__(self, idx: int):
        return self.get(idx)


class ShapesDataset(_InMemoryDataset):
    """The embedded dataset: `num_images` anti-aliased RGB shapes in 8 balanced classes (SHAPE_CLASSES)."""

    def __init__(self, num_images: int = 2048, resolution: int = 16, seed: int = 0, version: int = SHAPES_VERSION):
        images, labels = generate_shapes(num_images, resolution, seed, version)
        super().__init__(torch.from_numpy(images), torch.from_numpy(labels))
        self.classes = SHAPE_CLASSES


class GMMDataset(_InMemoryDataset):
    """An isotropic Gaussian mixture in image shape, D = C*H*W, overall per-dimension std sigma_d.

    Parameters (float64, from `seed`): means (K, D), stds (K,), weights (K,); the density is
    sum_k weights[k] N(x; means[k], stds[k]^2 I). Each epoch is a fresh draw of `num_samples` points
    (a function of (seed, epoch)), so training sees the distribution, not one finite sample. Labels are -1.
    """

    def __init__(self, num_samples: int = 2048, shape: tuple[int, int, int] = (1, 4, 4),
                 num_components: int = 8, seed: int = 0, sigma_d: float = 0.5, mean_resolution: int = 0):
        from scm.gmm import GaussianMixture

        self.num_samples, self.seed, self.sample_shape = num_samples, seed, tuple(shape)
        # The mixture lives in scm.gmm (exact velocity and consistency function of the same parameters).
        self.mixture = GaussianMixture.for_data(num_components, math.prod(shape), seed, sigma_d, tuple(shape),
                                                mean_resolution)
        self.means, self.stds, self.weights = self.mixture.means, self.mixture.stds, self.mixture.weights
        self._epoch = -1
        super().__init__(torch.empty(0), torch.full((num_samples,), -1, dtype=torch.int64))
        self._draw_epoch(0)

    def __len__(self) -> int:
        return self.num_samples

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.sample_shape

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n points (float32, (n, C, H, W)) and their component indices (int64), from generator `seed`."""
        rng = np.random.default_rng([self.seed, 1, seed])
        comp = rng.choice(len(self.weights), size=n, p=self.weights.numpy())
        noise = rng.standard_normal((n, self.means.shape[1]))
        x = self.means.numpy()[comp] + self.stds.numpy()[comp, None] * noise
        return torch.from_numpy(x.astype(np.float32)).reshape(n, *self.sample_shape), torch.from_numpy(comp)

    def _draw_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self.data, self.components = self.sample(self.num_samples, epoch)
            self._epoch = epoch

    def get_batch(self, indices: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        self._draw_epoch(epoch)
        return super().get_batch(indices, epoch)


class Cifar10Dataset(_InMemoryDataset):
    """CIFAR-10 (torchvision's python version under `root`); never downloads (compute nodes lack internet)."""

    def __init__(self, root: str, train: bool = True):
        import torchvision  # noqa: PLC0415  (slow import, only needed here)

        try:
            ds = torchvision.datasets.CIFAR10(root, train=train, download=False)
        except RuntimeError:
            raise FileNotFoundError(
                f"CIFAR-10 not found (or corrupt) under {root!r}: run `scm data fetch cifar10 --root {root}` "
                "on a machine with internet (the login node)") from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        super().__init__(images, torch.tensor(ds.targets, dtype=torch.int64))
        self.classes = tuple(ds.classes)


def fetch_cifar10(root: str) -> str:
    """Download CIFAR-10 into `root` (needs internet; the login node); returns root."""
    import torchvision  # noqa: PLC0415

    for train in (True, False):
        torchvision.datasets.CIFAR10(root, train=train, download=True)
    LOGGER.info("CIFAR-10 is in %s", root)
    return root


# ----------------------------------------------------------------------------
# EDM2 dataset ZIPs: images `{idx_str[:5]}/img{idx_str}.png` or latents `.../img-mean-std-{idx_str}.npy`
# (idx_str = f"{idx:08d}"), and `dataset.json` = {"labels": [[fname, class], ...] or null}.

_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class ZipDataset(torch.utils.data.Dataset):
    """An EDM2 dataset ZIP, read lazily (each process opens its own handle; nothing is extracted).

    Entries are the images (or latents) in sorted name order. Latent files hold mean and std concatenated
    along channels, (2C, H, W); an item is z = mean + std * noise with noise from a generator seeded by
    (seed, epoch, idx), then (z - latent_mean) / latent_std * sigma_d per channel (raw z without stats).
    """

    def __init__(self, path: str, latent_mean=None, latent_std=None, sigma_d: float = 0.5, seed: int = 0):
        self.path, self.sigma_d, self.seed = str(path), sigma_d, seed
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"dataset ZIP not found: {self.path}")
        with zipfile.ZipFile(self.path) as z:
            all_names = set(z.namelist())
            self.names = sorted(n for n in all_names if n.lower().endswith(_IMAGE_EXTS + (".npy",)))
            meta = json.loads(z.read("dataset.json")) if "dataset.json" in all_names else {}
        kinds = {n.lower().endswith(".npy") for n in self.names}
        if len(kinds) != 1:
            raise ValueError(f"{self.path}: expected PNG/JPEG images or .npy latents, "
                             f"found {'both' if kinds else 'neither'}")
        self.latents = kinds.pop()
        # Labels from dataset.json, matched by file name; -1 when it has none.
        table = (meta or {}).get("labels")
        if table is None:
            self.labels = torch.full((len(self.names),), -1, dtype=torch.int64)
        else:
            table = {name.replace("\\", "/"): label for name, label in table}
            missing = [n for n in self.names if n not in table]
            if missing:
                raise ValueError(f"{self.path}: dataset.json has no label for {len(missing)} entries, "
                                 f"e.g. {missing[0]}")
            self.labels = torch.tensor([table[n] for n in self.names], dtype=torch.int64)
        self._zip, self._pid = None, None
        first = self._read(0)
        self.shape = (first.shape[0] // 2 if self.latents else first.shape[0], *first.shape[1:])
        # Per-channel normalization of latents, as (C, 1, 1) tensors.
        per_channel = lambda v: None if v is None else torch.tensor(v, dtype=torch.float32)[:, None, None]
        self.latent_mean, self.latent_std = per_channel(latent_mean), per_channel(latent_std)

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self):
        return {**self.__dict__, "_zip": None, "_pid": None}  # a ZIP handle does not cross processes

    def _read(self, idx: int) -> np.ndarray:
        """The raw entry: uint8 CHW image or float latent mean/std (2C, H, W)."""
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
        data = io.BytesIO(self._zip.read(self.names[idx]))
        if self.latents:
            return np.load(data)
        image = np.array(PIL.Image.open(data))
        return (image[:, :, None] if image.ndim == 2 else image).transpose(2, 0, 1)

    def get(self, idx: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self._read(idx)
        if not self.latents:
            return _to_float(torch.from_numpy(np.ascontiguousarray(raw))), self.labels[idx]
        mean, std = np.split(raw.astype(np.float32), 2, axis=0)
        noise = np.random.default_rng([self.seed, epoch, idx]).standard_normal(mean.shape, dtype=np.float32)
        z = torch.from_numpy(mean + std * noise)
        if self.latent_mean is not None:
            z = (z - self.latent_mean) / self.latent_std * self.sigma_d
        return z, self.labels[idx]

    def __getitem__(self, idx: int):
        return self.get(idx)


def write_edm_zip(path: str, data, labels=None) -> list[str]:
    """Write an uncompressed EDM2 dataset ZIP; returns the entry names.

    data: uint8 images (N, H, W, C) with C in {1, 3}, written as PNG; or floating latents (N, 2C, H, W)
    (mean and std concatenated), written as .npy. labels: N class indices, or None (dataset.json labels null).
    """
    data = np.asarray(data)
    is_latent = np.issubdtype(data.dtype, np.floating)
    if not is_latent and (data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] not in (1, 3)):
        raise ValueError(f"write_edm_zip: expected uint8 (N, H, W, 1|3) images or float latents, "
                         f"got {data.dtype} {data.shape}")
    names = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for idx, item in enumerate(data):
            idx_str = f"{idx:08d}"
            buf = io.BytesIO()
            if is_latent:
                name = f"{idx_str[:5]}/img-mean-std-{idx_str}.npy"
                np.save(buf, item)
            else:
                name = f"{idx_str[:5]}/img{idx_str}.png"
                PIL.Image.fromarray(item[:, :, 0] if item.shape[-1] == 1 else item).save(
                    buf, format="png", compress_level=0, optimize=False)
            z.writestr(name, buf.getvalue())
            names.append(name)
        table = None if labels is None else [[n, int(y)] for n, y in zip(names, labels, strict=True)]
        z.writestr("dataset.json", json.dumps({"labels": table}))
    return names


# ----------------------------------------------------------------------------
# From the config: one dataset per data.name, checked against the shape and labels the config expects.


def build_dataset(data_cfg: DataConfig, sigma_d: float):
    """The dataset of `data_cfg`; errors name the config key to fix."""
    name = data_cfg.name
    if name == "shapes":
        if data_cfg.channels != 3:
            raise ConfigError(f"data.channels: shapes are RGB (3), got {data_cfg.channels}")
        ds = ShapesDataset(data_cfg.num_images, data_cfg.resolution, version=data_cfg.shapes_version)
    elif name == "gmm":
        shape = (data_cfg.channels, data_cfg.resolution, data_cfg.resolution)
        ds = GMMDataset(data_cfg.num_images, shape, data_cfg.gmm_components, data_cfg.gmm_seed, sigma_d,
                        data_cfg.gmm_mean_resolution)
    elif name in ("cifar10", "zip", "imagenet64", "imagenet512"):
        if not data_cfg.path:
            what = "the CIFAR-10 root folder" if name == "cifar10" else "an EDM2 dataset ZIP"
            raise ConfigError(f"data.path: data.name={name!r} needs a path ({what})")
        ds = _build_file_dataset(data_cfg, sigma_d)
    else:
        raise ConfigError(f"data.name: unknown dataset {name!r}; choose one of "
                          "['shapes', 'gmm', 'cifar10', 'zip', 'imagenet64', 'imagenet512']")
    # The network is built from the config: the data must have the shape it promises.
    want = (data_cfg.channels, data_cfg.resolution, data_cfg.resolution)
    if tuple(ds.shape) != want:
        raise ConfigError(f"data.resolution/data.channels: the config says (C, H, W) = {want}, "
                          f"the {name} data is {tuple(ds.shape)}")
    # Labels: dropped (-1) for unconditional runs; required and in range for conditional ones.
    if data_cfg.label_dim == 0:
        ds.labels = torch.full_like(ds.labels, -1)
    elif bool((ds.labels < 0).any()):
        raise ConfigError(f"data.label_dim: {data_cfg.label_dim} classes, but the {name} data has no labels; "
                          "set data.label_dim=0")
    elif int(ds.labels.max()) >= data_cfg.label_dim:
        raise ConfigError(f"data.label_dim: {data_cfg.label_dim} classes, but the {name} data has label "
                          f"{int(ds.labels.max())}")
    LOGGER.info("dataset %s: %d items of shape %s", name, len(ds), tuple(ds.shape))
    return ds


def _build_file_dataset(data_cfg: DataConfig, sigma_d: float):
    if data_cfg.name == "cifar10":
        try:
            return Cifar10Dataset(data_cfg.path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.path: {e}") from None
    if not os.path.isfile(data_cfg.path):
        raise FileNotFoundError(f"data.path: dataset ZIP {data_cfg.path!r} not found")
    mean, std = data_cfg.latent_mean or None, data_cfg.latent_std or None
    ds = ZipDataset(data_cfg.path, mean, std, sigma_d)
    if ds.latents:
        # Latents must be normalized to std sigma_d: the per-channel statistics are part of the config.
        for key, stats in (("latent_mean", mean), ("latent_std", std)):
            if stats is None or len(stats) != ds.shape[0]:
                raise ConfigError(f"data.{key}: latents need {ds.shape[0]} per-channel values, got {stats}")
    return ds


# ----------------------------------------------------------------------------
# The infinite loader. The index stream is the concatenation of per-epoch permutations (each from a
# generator seeded by (seed, epoch)); global batch k is stream positions [k B, (k+1) B), so a batch may
# span two epochs and nothing is dropped. Rank r takes the r-th 1/world_size slice of each global batch.


def _fetch(dataset, idx: np.ndarray, epochs: np.ndarray, flips: np.ndarray):
    """The items (idx[i] as seen in epochs[i]) stacked, flipped horizontally where flips[i]."""
    if hasattr(dataset, "get_batch"):
        # Epochs are non-decreasing within a batch: one indexing call per epoch keeps the order.
        parts = [dataset.get_batch(torch.from_numpy(idx[epochs == e]), int(e)) for e in np.unique(epochs)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    else:
        get = getattr(dataset, "get", lambda i, e: dataset[i])
        items = [get(int(i), int(e)) for i, e in zip(idx, epochs, strict=True)]
        x = torch.stack([torch.as_tensor(item[0], dtype=torch.float32) for item in items])
        y = torch.stack([torch.as_tensor(item[1], dtype=torch.int64) for item in items])
    flips = torch.from_numpy(flips)
    x[flips] = x[flips].flip(-1)
    return x.contiguous(), y


class _PlanFetcher(torch.utils.data.Dataset):
    """For DataLoader workers: the 'index' is a whole batch plan (indices, epochs, flips)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, plan):
        return _fetch(self.dataset, *plan)


class _Plans:
    """The infinite sequence of batch plans that follows (epoch, position)."""

    def __init__(self, loader: InfiniteLoader, epoch: int, position: int):
        self.loader, self.epoch, self.position = loader, epoch, position

    def __iter__(self):
        while True:
            plan, self.epoch, self.position = self.loader._plan(self.epoch, self.position)
            yield plan


class InfiniteLoader:
    """Yields (x, labels) batches of batch_size // world_size items forever; resumable via state_dict().

    xflip: each stream position draws a horizontal flip from the same per-epoch generator.
    num_workers > 0 reads items in DataLoader worker processes (for ZIPs); results are identical.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 xflip: bool = False, num_workers: int = 0):
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size} must split evenly over world_size={world_size} "
                             f"(rank={rank})")
        if len(dataset) == 0:
            raise ValueError("InfiniteLoader: the dataset is empty")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.xflip, self.num_workers = rank, world_size, xflip, num_workers
        self.num_samples = len(dataset)
        self.epoch, self.position = 0, 0
        self._order = None  # (epoch, permutation, flips) of the last epoch asked for
        self._worker_iter = None

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.num_samples)
            flips = (rng.random(self.num_samples) < 0.5) & self.xflip
            self._order = (epoch, perm, flips)
        return self._order[1], self._order[2]

    def _plan(self, epoch: int, position: int):
        """This rank's part of the global batch at (epoch, position), and the (epoch, position) after it."""
        idx, epochs, flips, need = [], [], [], self.batch_size
        while need > 0:
            perm, flip = self._epoch_order(epoch)
            take = min(need, self.num_samples - position)
            idx.append(perm[position:position + take])
            epochs.append(np.full(take, epoch))
            flips.append(flip[position:position + take])
            need, position = need - take, position + take
            if position == self.num_samples:
                epoch, position = epoch + 1, 0
        local_batch = self.batch_size // self.world_size
        local = slice(self.rank * local_batch, (self.rank + 1) * local_batch)
        plan = tuple(np.concatenate(a)[local] for a in (idx, epochs, flips))
        return plan, epoch, position

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_workers == 0:
            plan, self.epoch, self.position = self._plan(self.epoch, self.position)
            return _fetch(self.dataset, *plan)
        # Workers run ahead on their own copy of the plan sequence; our state counts batches handed out.
        if self._worker_iter is None:
            self._worker_iter = iter(torch.utils.data.DataLoader(
                _PlanFetcher(self.dataset), batch_size=None, sampler=_Plans(self, self.epoch, self.position),
                num_workers=self.num_workers))
        batch = next(self._worker_iter)
        end = self.position + self.batch_size
        self.epoch, self.position = self.epoch + end // self.num_samples, end % self.num_samples
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position,
                "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        # Another seed or dataset size would make the saved position meaningless.
        for key in ("seed", "num_samples"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(f"loader state is for {key}={state[key]}, "
                                 f"this loader has {getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._worker_iter = None


# ----------------------------------------------------------------------------
# Image grids.


def save_image_grid(images, path: str, nrow: int | None = None, scale: int | None = None,
                    pad: int = 1) -> None:
    """Write images (N, C, H, W) in [-1, 1] as one uint8 PNG grid, nrow images per row.

    C = 1 gives grayscale, C = 3 RGB; latents (C = 4) show their first 3 channels, clipped.
    scale: nearest-neighbour upscaling of the whole grid (default: tiles of at least 64 pixels);
    pad: gray pixels between tiles (before scaling).
    """
    x = torch.as_tensor(images).detach().float().cpu()
    n, c, h, w = x.shape
    if c == 4:
        x, c = x[:, :3], 3
    if c not in (1, 3):
        raise ValueError(f"save_image_grid: expected 1, 3 or 4 channels, got {c}")
    nrow = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / nrow)
    scale = scale or max(1, 64 // max(h, w))
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    grid = torch.full((c, nrows * (h + pad) + pad, nrow * (w + pad) + pad), 128, dtype=torch.uint8)
    for i in range(n):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[:, top:top + h, left:left + w] = u8[i]
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    array = grid.permute(1, 2, 0).numpy()
    PIL.Image.fromarray(array[:, :, 0] if c == 1 else array).save(path)
