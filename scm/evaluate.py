"""Sampling and evaluation of finished runs (`scm sample`, `scm evaluate`).

Sample k depends on the seed k only: its noise, its label (uniform over classes for conditional runs)
and the fresh noise of later consistency steps come from torch.Generator().manual_seed(k), in that order.
Every network call runs a full batch of `batch` rows (the last one padded) and rows do not influence each
other, so for a fixed --batch any sharding or seed subset gives the same PNG bytes (CPU and CUDA). Across
different --batch values the bytes are equal only where the backend's per-row results do not depend on
the batch size: on this CPU they were (batch >= 16 bit-identical); on an H200, 2-4% of images differed
by one quantization step in some pixel (matmul kernels chosen per shape). Keep --batch fixed in a study.

metrics.json (write_metrics) is a JSON list with one flat entry per --steps value, so that
`pandas.DataFrame(json.load(f))` (or `pandas.read_json(path)`) gives one row per (run, steps):

    run_id, run_dir, dataset, method, size      the run (run_id = run directory name)
    params, params_m                             network parameters (count, millions)
    steps, sampler, solver, guidance, nfe        sampling ('consistency' steps or a teacher solver)
    effective_compute                            params (billions) x NFE (sCM Figure 1's x axis)
    num_samples, seed_sets, seeds                samples per set, number of sets, "A-B" per set
    fid, fid_min, fid_max, fid_mean, fid_sd      FID per seed set; min (the paper's report), max, mean, sd
    class_accuracy, class_accuracy_min/_max/_mean/_sd
                                                 conditional shapes runs: per seed set, the fraction of samples
                                                 the shapes extractor's classifier assigns to the label they were
                                                 conditioned on (chance 1/8); null otherwise
    fjd, fjd_min/_max/_mean/_sd                  conditional shapes runs: Fréchet joint distance of (features,
                                                 label) (DeVries et al. 2019): FID that also sees wrong classes
    kid, kid_sd, precision, recall               means over seed sets (null where unavailable)
    fd_dinov2, fd_dinov2_min/_max/_mean/_sd      only with a DINOv2 model file
    feature_extractor, extractor_fingerprint, extractor_accuracy, extractor_shapes_version (shapes),
    ref_stats, ref_stats_path
    sample_seconds, metric_seconds               seconds of sampling and of features + metrics, summed over tasks
    eval_gpus, eval_threads                      GPUs held per task (0 on the CPU) and torch CPU threads per task:
                                                 the report's evaluation GPU-hours (or CPU-hours)
    device, torch

A sharded evaluation (`--shards K`, scm.eval_shards) writes the same entries.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from scm import extractors, metrics
from scm.config import REF_STATS_DIR, ConfigError
from scm.fileio import atomic_write_bytes, atomic_write_text
from scm.samplers import cm_times, consistency_sample, teacher_sample

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Seeds and shards.


def parse_seeds(text: str) -> list[int]:
    """'0-9,20,30-31' -> [0, ..., 9, 20, 30, 31] (ranges inclusive, as EDM's --seeds)."""
    seeds = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"--seeds: cannot parse {part!r}; use e.g. 0-49999 or 0,5,7-9")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"--seeds: empty range {part!r}")
        seeds.extend(range(a, b + 1))
    return seeds


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' with 0 <= I < N."""
    m = re.fullmatch(r"(\d+)/(\d+)", str(text).strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard: expected I/N with 0 <= I < N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def format_seeds(seeds: list[int]) -> str:
    """Inverse of parse_seeds, with runs of consecutive seeds as ranges."""
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def seed_inputs(seeds: list[int], shape: tuple[int, ...], label_dim: int, extra_noises: int = 0):
    """(noise (N, *shape), labels (N,) or None, [extra noise (N, *shape)] * extra_noises), per seed."""
    noise, labels, extras = [], [], [[] for _ in range(extra_noises)]
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        noise.append(torch.randn(shape, generator=g))
        if label_dim > 0:
            labels.append(torch.randint(label_dim, (), generator=g))
        for e in extras:
            e.append(torch.randn(shape, generator=g))
    return (torch.stack(noise), torch.stack(labels) if labels else None, [torch.stack(e) for e in extras])


def seed_labels(cfg, seeds: list[int]) -> torch.Tensor | None:
    """The class each seed's sample is conditioned on (as generate draws it); None for unconditional runs."""
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    return seed_inputs(seeds, shape, cfg.data.label_dim)[1]


# ----------------------------------------------------------------------------
# Sampling.


@dataclass
class SamplerSpec:
    kind: str  # 'consistency' or 'teacher'
    steps: int
    solver: str | None  # teacher solver
    guidance: float
    sigma_max: float
    t_mid: float

    @property
    def name(self) -> str:
        return "consistency" if self.kind == "consistency" else self.solver


def sampler_spec(cfg, steps: int, solver: str | None = None, guidance: float | None = None) -> SamplerSpec:
    """CMs (sct/scd): `steps` consistency steps; teachers: `steps` solver steps (solver/guidance from
    config.sampler unless given)."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    s = cfg.sampler
    kind = "teacher" if cfg.run.method == "teacher" else "consistency"
    return SamplerSpec(kind, int(steps), (solver or s.teacher_solver) if kind == "teacher" else None,
                       float(s.guidance if guidance is None else guidance), s.sigma_max, s.t_mid)


def _sample_batch(net, cfg, spec: SamplerSpec, noise, labels, extras):
    """One batch of float samples (data space) and its NFE per sample."""
    sigma_d = cfg.sigma_d
    if spec.kind == "teacher":
        return teacher_sample(net, noise, sigma_d, labels, spec.solver, spec.steps, spec.sigma_max, spec.guidance)
    # Consistency steps one at a time, so that step i > 0 uses this seed's own fresh noise extras[i - 1]:
    # x_t = cos t x0 + sin t sigma_d z enters as noise' = x_t / sigma_d of a one-time call at t.
    times = cm_times(spec.steps, spec.sigma_max, sigma_d, spec.t_mid)
    x_in, x0, nfe = noise, None, 0
    for i, t in enumerate(times):
        if i > 0:
            x_in = (math.cos(t) * x0 + math.sin(t) * sigma_d * extras[i - 1]) / sigma_d
        x0, n = consistency_sample(net, x_in, sigma_d, labels, times=[t], guidance=spec.guidance,
                                   guidance_input=cfg.network.guidance_input)
        nfe += n
    return x0, nfe


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_vae(path, device="cpu"):
    """The SD VAE (diffusers AutoencoderKL) from a local folder; diffusers is the optional extra 'vae'."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("decoding latents needs diffusers: pip install 'scm-bench[vae]' "
                          "(and pass --vae PATH to a local sd-vae-ft-mse folder)") from None
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"--vae: local AutoencoderKL folder {path!r} not found (no downloads here)")
    return AutoencoderKL.from_pretrained(str(path), local_files_only=True).to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae, x: torch.Tensor, data_cfg, sigma_d: float) -> torch.Tensor:
    """Normalized latents -> images in [-1, 1]: undo ZipDataset's (z - mean) / std * sigma_d, then decode
    the raw latents (EDM2 stores unscaled VAE means)."""
    mean = torch.tensor(data_cfg.latent_mean, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(data_cfg.latent_std, device=x.device).reshape(1, -1, 1, 1)
    z = x / sigma_d * std + mean
    return vae.decode(z.to(next(vae.parameters()).dtype)).sample.float()


def _pad_rows(a: torch.Tensor | None, rows: int, device) -> torch.Tensor | None:
    """`a` with its last row repeated up to `rows` rows, on `device`."""
    if a is None:
        return None
    return torch.cat([a, a[-1:].expand(rows - len(a), *a.shape[1:])]).to(device)


@torch.no_grad()
def generate(net, cfg, seeds: list[int], steps: int, batch: int = 64, solver: str | None = None,
             guidance: float | None = None, device="cpu", vae=None) -> tuple[torch.Tensor, int]:
    """uint8 images (N, 3, H, W) for `seeds` (in order) and the NFE per sample."""
    device = torch.device(device)
    spec = sampler_spec(cfg, steps, solver, guidance)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    if shape[0] == 4 and vae is None:
        raise ValueError("this run generates 4-channel latents: pass --vae PATH (a local SD VAE) to decode them")
    extra = spec.steps - 1 if spec.kind == "consistency" else 0
    net = net.to(device).eval()
    out, nfe = [], 0
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        noise, labels, extras = seed_inputs(chunk, shape, cfg.data.label_dim, extra)
        # Pad to a full batch (repeating the last row): the batch size, never the seed subset, sets the numerics.
        noise, labels = _pad_rows(noise, batch, device), _pad_rows(labels, batch, device)
        extras = [_pad_rows(e, batch, device) for e in extras]
        x, nfe = _sample_batch(net, cfg, spec, noise, labels, extras)
        x = x[:len(chunk)]
        if shape[0] == 4:
            x = decode_latents(vae, x, cfg.data, cfg.sigma_d)
        out.append(metrics.to_uint8(x).cpu())
    return torch.cat(out), nfe


def write_pngs(images: torch.Tensor, seeds: list[int], out_dir) -> None:
    """`{seed:06d}.png` per image, each written atomically (a killed task leaves no half-written PNG)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for img, seed in zip(images, seeds, strict=True):
        array = img.permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buf, format="PNG")
        atomic_write_bytes(out_dir / f"{seed:06d}.png", buf.getvalue())


def write_grid(images: torch.Tensor, path, limit: int = 64) -> None:
    from scm.data import save_image_grid

    save_image_grid(images[:limit].float() / 127.5 - 1, str(path))  # exact round trip to the same uint8


def sample_run(run_dir, steps: int, seeds: list[int], out_dir, batch: int = 64, shard: tuple[int, int] = (0, 1),
               solver: str | None = None, guidance: float | None = None, device: str = "auto",
               vae_path=None, grid: bool = True) -> dict:
    """Generate this shard's seeds (seeds[I::N]) of a finished run's EMA network into PNGs (+ grid.png from
    shard 0 when `grid`); returns {num, nfe, seconds, out_dir}."""
    from scm.train import load_final

    t0 = time.time()
    device = resolve_device(device)
    net, cfg = load_final(Path(run_dir), "ema", device)
    mine = seeds[shard[0]::shard[1]]
    if not mine:  # more shards than seeds
        return {"num": 0, "nfe": 0, "seconds": 0.0, "out_dir": str(out_dir)}
    vae = load_vae(vae_path, device) if cfg.data.channels == 4 else None
    images, nfe = generate(net, cfg, mine, steps, batch, solver, guidance, device, vae)
    write_pngs(images, mine, out_dir)
    if grid and shard[0] == 0 and len(mine):
        write_grid(images, Path(out_dir) / "grid.png")
    return {"num": len(mine), "nfe": nfe, "seconds": round(time.time() - t0, 3), "out_dir": str(out_dir)}


# ----------------------------------------------------------------------------
# Evaluation.


def real_images(data_cfg, with_labels: bool = False):
    """The run's training images as uint8 (N, 3, H, W); None for data without images (latents, GMM).
    with_labels: (images, labels) with labels int64 (N,) where the dataset has classes, else None."""
    from scm.data import Cifar10Dataset, ZipDataset
    from scm.shapes import generate_shapes

    name, images, labels = data_cfg.name, None, None
    if name == "shapes":  # exactly the set build_dataset trains on (seed 0)
        images, labels = (torch.from_numpy(a) for a in generate_shapes(
            data_cfg.num_images, data_cfg.resolution, version=data_cfg.shapes_version))
    elif name == "cifar10":
        ds = Cifar10Dataset(data_cfg.path)
        images, labels = ds.data, ds.labels
    elif name in ("zip", "imagenet64"):
        ds = ZipDataset(data_cfg.path)
        if not ds.latents:
            # get() maps u8 -> u / 127.5 - 1 in float32: the inverse below is exact.
            images = torch.stack([((ds.get(i)[0] + 1) * 127.5).round().to(torch.uint8) for i in range(len(ds))])
    if data_cfg.label_dim == 0:
        labels = None
    return (images, labels) if with_labels else images


def _entry_base(run_dir: Path, cfg, spec: SamplerSpec, nfe: int) -> dict:
    from scm.networks import count_parameters

    params = count_parameters(cfg.network, cfg.data, cfg.sigma_d)
    return {"run_id": run_dir.name, "run_dir": str(run_dir), "dataset": cfg.data.name, "method": cfg.run.method,
            "size": cfg.run.size, "params": params, "params_m": params / 1e6, "steps": spec.steps,
            "sampler": spec.name if spec.kind == "teacher" else "consistency", "solver": spec.solver,
            "guidance": spec.guidance, "nfe": nfe, "effective_compute": params / 1e9 * nfe}


def evaluate_run(run_dir, steps: list[int], num: int = 1024, seed_sets: int = 1, first_seed: int = 0,
                 batch: int = 64, solver: str | None = None, guidance: float | None = None,
                 extractor: str | None = None, extractor_weights=None, cache_dir=REF_STATS_DIR,
                 ref_stats=None, dinov2=None, kid: bool = True, prc: bool = True, kid_subsets: int = 100,
                 device: str = "auto", vae_path=None) -> list[dict]:
    """One metrics entry per value of `steps`; seed set j uses seeds first_seed + [j num, (j + 1) num)."""
    from scm.train import load_final

    run_dir = Path(run_dir)
    device = resolve_device(device)
    net, cfg = load_final(run_dir, "ema", device)
    vae = load_vae(vae_path, device) if cfg.data.channels == 4 else None
    ref, ref_path, dino = references(cfg, extractor, extractor_weights, cache_dir, ref_stats, dinov2, device)
    sets = seed_set_list(num, seed_sets, first_seed)
    entries = []
    for s in steps:
        spec = sampler_spec(cfg, s, solver, guidance)
        per_set, t_sample, t_metric, nfe = [], 0.0, 0.0, 0
        for seeds in sets:
            t0 = time.time()
            gen, nfe = generate(net, cfg, seeds, s, batch, solver, guidance, device, vae)
            t1 = time.time()
            m = metrics.compute_metrics(gen, ref, kid, prc, str(device), kid_subsets=kid_subsets,
                                        labels=seed_labels(cfg, seeds))
            if dino is not None:
                m["fd_dinov2"] = metrics.compute_metrics(gen, dino, False, False, str(device))["fid"]
            t_sample, t_metric = t_sample + t1 - t0, t_metric + time.time() - t1
            per_set.append(m)
            log.info("%s steps=%d seeds %s: FID %.4f, class accuracy %s", run_dir.name, s, format_seeds(seeds),
                     m["fid"], m["class_accuracy"])
        entries.append(metrics_entry(run_dir, cfg, spec, nfe, sets, per_set, ref, ref_path, dino is not None,
                                     t_sample, t_metric, device, device_count(device), torch.get_num_threads()))
    return entries


def seed_set_list(num: int, seed_sets: int, first_seed: int = 0) -> list[list[int]]:
    """Seed set j: seeds first_seed + [j num, (j + 1) num) (disjoint sets, as the paper's repeated FIDs)."""
    return [list(range(first_seed + j * num, first_seed + (j + 1) * num)) for j in range(seed_sets)]


def device_count(device) -> int:
    """GPUs this process holds (what the evaluation's GPU-hours count); 0 on the CPU."""
    return torch.cuda.device_count() if torch.device(device).type == "cuda" else 0


def references(cfg, extractor=None, extractor_weights=None, cache_dir=REF_STATS_DIR, ref_stats=None,
               dinov2=None, device="cpu"):
    """(FID reference, its statistics file, DINOv2 reference or None) of a run's dataset."""
    images, real_labels = (None, None) if ref_stats else real_images(cfg.data, with_labels=True)
    version = cfg.data.shapes_version if cfg.data.name == "shapes" else None
    ref = metrics.make_reference(cfg.data.name, images, extractor, extractor_weights, cache_dir, ref_stats,
                                 labels=real_labels, shapes_version=version)
    ref_path = metrics.reference_stats(ref, str(device))[2]
    dino = (metrics.make_reference(cfg.data.name, images, extractors.DINOV2_EXTRACTOR, dinov2, cache_dir, ref_stats)
            if dinov2 else None)
    return ref, ref_path, dino


def metrics_entry(run_dir: Path, cfg, spec: SamplerSpec, nfe: int, sets: list[list[int]], per_set: list[dict],
                  ref, ref_path, with_dino: bool, t_sample: float, t_metric: float, device, gpus: int,
                  threads: int) -> dict:
    """One metrics.json entry from the per-seed-set metrics (the schema in this module's docstring)."""
    entry = _entry_base(run_dir, cfg, spec, nfe)
    entry.update({"num_samples": len(sets[0]), "seed_sets": len(sets), "seeds": [format_seeds(x) for x in sets]})
    # Per seed set and min/max/mean/sd over sets; class-aware metrics only where they exist (else null).
    keys = ["fid", "class_accuracy", "fjd"] + (["fd_dinov2"] if with_dino else [])
    for key in keys:
        vals = [m[key] for m in per_set]
        stats = metrics.summarize(vals)
        entry.update({key: vals if stats["mean"] is not None else None,
                      **{f"{key}_{k}": stats[k] for k in ("min", "max", "mean", "sd")}})
    for key in ("kid", "kid_sd", "precision", "recall"):
        entry[key] = metrics.summarize([m[key] for m in per_set])["mean"]
    entry.update(extractors.extractor_info(ref.extractor, ref.weights_path))
    entry.update({"ref_stats": ref.name, "ref_stats_path": str(ref_path),
                  "sample_seconds": round(t_sample, 3), "metric_seconds": round(t_metric, 3),
                  "eval_gpus": gpus, "eval_threads": threads, "device": str(device), "torch": str(torch.__version__)})
    return entry


def write_metrics(entries: list[dict], path) -> Path:
    """metrics.json: a JSON list of entries (schema in this module's docstring), written atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(entries, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


# ----------------------------------------------------------------------------
# A study's evaluation inputs, checked when the pipeline builds its DAG (before any training).

REAL_IMAGE_DATASETS = ("cifar10", "imagenet64", "imagenet512", "zip")
EVAL_INPUT_KEYS = ("inception", "vae", "dinov2", "ref_stats")


def study_eval_inputs(data_cfg, eval_cfg: dict) -> dict[str, str]:
    """{key: path} of the files a study's evaluations read (keys of its `eval` section); a needed one that is
    unset or missing, or a given one that is missing, is a ConfigError naming the key and the path."""
    why = {}
    if data_cfg.name in REAL_IMAGE_DATASETS:
        why["inception"] = "FID needs Inception-v3 weights: `scm data fetch-weights inception --out PATH`"
    if data_cfg.channels == 4:
        why["vae"] = f"{data_cfg.name} generates latents: a local SD-VAE folder (sd-vae-ft-mse) decodes them"
        why["ref_stats"] = f"{data_cfg.name} has no images to compute reference statistics from (EDM2's .pkl)"
    if eval_cfg.get("fd_dinov2"):
        why["dinov2"] = "eval.fd_dinov2 needs a DINOv2 model: `scm data fetch-weights dinov2 --out PATH`"
    paths = {}
    for key in EVAL_INPUT_KEYS:
        path = eval_cfg.get(key)
        if not path and key in why:
            raise ConfigError(f"eval.{key}: not set ({why[key]})", key=f"eval.{key}")
        if path and not Path(path).exists():
            raise ConfigError(f"eval.{key}: {path} not found ({why.get(key, 'given in the study file')})",
                              key=f"eval.{key}")
        if path:
            paths[key] = str(path)
    return paths
