"""Sharded evaluation and sampling: K tasks (a SLURM job array, K local jobs, or in-process) and a reduce step.

- Shard i of K takes seeds[i::K] of every (steps, seed set). Sample k depends on seed k only (scm.evaluate),
  so the shards' samples are the unsharded run's samples, split.
- A shard writes `<out>.shards/steps{S}-set{J}-shard{I}of{K}.npz` atomically (temp + fsync + rename): its
  features (the layers FID, KID and precision/recall read), their float64 moments (n, sum x, sum x x^T),
  the labels its samples were conditioned on and the shapes classifier's predictions, DINOv2 moments, and
  its identity (the run's final.pt digest, steps, sampler, seeds, extractor fingerprints). A file whose
  identity differs from the evaluation asked for, or that cannot be read, is computed again; the others are
  kept, so a re-run after a kill or a requeue redoes only the missing shards.
- The reduce step merges the moments into FID (float64, the Frechet distance of Heusel et al. 2017 as
  scm.metrics computes it), KID and precision/recall from the stored features (torch-fidelity's own
  functions, features in seed order), class accuracy and FJD as scm.metrics does, and writes the same
  metrics.json entries as scm.evaluate.evaluate_run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import submitit
import torch

from scm import evaluate, extractors
from scm.checkpoint import checkpoint_digest
from scm.config import REF_STATS_DIR, from_dict
from scm.fileio import atomic_write_bytes, file_fingerprint
from scm.metrics import (
    ImageTensorDataset,
    Reference,
    _fidelity_kwargs,
    extract_features,
    frechet_distance,
    frechet_joint_distance,
    ref_classes,
    reference_stats,
)

log = logging.getLogger(__name__)

SHARD_FORMAT = 1  # bump when a shard file's content changes meaning


class ShardsMissingError(RuntimeError):
    """The reduce step found shard files missing or stale (their tasks failed or were killed)."""


@dataclass
class EvalSpec:
    """Everything a shard task and the reduce step need (plain values: it travels to SLURM pickled)."""

    run_dir: str
    steps: list
    shard_dir: str
    shards: int = 1
    num: int = 1024
    seed_sets: int = 1
    first_seed: int = 0
    batch: int = 64
    solver: str | None = None
    guidance: float | None = None
    extractor: str | None = None
    extractor_weights: str | None = None
    cache_dir: str = REF_STATS_DIR
    ref_stats: str | None = None
    dinov2: str | None = None
    kid: bool = True
    prc: bool = True
    kid_subsets: int = 100
    device: str = "auto"
    vae_path: str | None = None
    threads: int = 0


# ----------------------------------------------------------------------------
# Seeds per shard, shard files and their identity.


def split_seeds(seeds: list[int], shards: int) -> list[list[int]]:
    """Shard i takes seeds[i::shards] (the rule of `scm sample --shard I/N`)."""
    if shards < 1:
        raise ValueError(f"--shards: expected >= 1, got {shards}")
    return [seeds[i::shards] for i in range(shards)]


def shard_path(shard_dir, steps: int, set_index: int, shard: int, shards: int) -> Path:
    return Path(shard_dir) / f"steps{steps}-set{set_index}-shard{shard}of{shards}.npz"


def _open_run(spec):
    """(start time, run dir, device, final.pt digest, run config) of a task or the reduce step; torch's
    threads set first."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    run_dir = Path(spec.run_dir)
    return time.time(), run_dir, evaluate.resolve_device(spec.device), checkpoint_digest(run_dir / "final.pt"), \
        _run_config(run_dir)


def _run_config(run_dir):
    return from_dict(json.loads((Path(run_dir) / "config.json").read_text()))


def _feature_reference(spec: EvalSpec, cfg) -> Reference:
    """The FID extractor with its local weights (no real images: a task only extracts features)."""
    extractors.register_extractors()
    extractor = spec.extractor or extractors.default_extractor(cfg.data.name)
    version = cfg.data.shapes_version if cfg.data.name == "shapes" else 1
    weights = extractors.resolve_weights(extractor, spec.extractor_weights, version)
    return Reference(cfg.data.name, extractor, weights, Path(spec.cache_dir))


def _dino_reference(spec: EvalSpec, cfg) -> Reference | None:
    if not spec.dinov2:
        return None
    extractors.register_extractors()
    dino = extractors.DINOV2_EXTRACTOR
    return Reference(cfg.data.name, dino, extractors.resolve_weights(dino, spec.dinov2), Path(spec.cache_dir))


def metric_layer(ref: Reference, metric: str) -> str:
    """The layer torch-fidelity reads for `metric` ('fid', 'kid', 'prc') with this extractor."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    return FEATURE_EXTRACTORS_REGISTRY[ref.extractor].get_default_feature_layer_for_metric(metric)


def feature_layers(ref: Reference, kid: bool, prc: bool) -> list[str]:
    """The layers a shard stores: FID's, and KID's and precision/recall's when those are computed."""
    metrics = ["fid"] + (["kid"] if kid else []) + (["prc"] if prc else [])
    return sorted({metric_layer(ref, m) for m in metrics})


def shard_identity(final_digest: str, cfg, spec: EvalSpec, steps: int, seeds: list[int], ref: Reference,
                   dino: Reference | None) -> dict:
    """What a shard file must match to be kept: the network, the sampler, the seeds and the extractors."""
    sampler = evaluate.sampler_spec(cfg, steps, spec.solver, spec.guidance)
    return {"format": SHARD_FORMAT, "final_sha256": final_digest, "steps": steps, "sampler": sampler.name,
            "guidance": sampler.guidance, "batch": spec.batch, "seeds": evaluate.format_seeds(seeds),
            "vae": str(spec.vae_path) if cfg.data.channels == 4 else None,
            "extractor": ref.extractor, "extractor_fingerprint": file_fingerprint(ref.weights_path),
            "layers": feature_layers(ref, spec.kid, spec.prc),
            "dinov2_fingerprint": file_fingerprint(dino.weights_path) if dino is not None else None}


def write_shard(path, identity: dict, arrays: dict) -> Path:
    """One shard file, written atomically (temp + fsync + rename): a killed task leaves no partial file."""
    buf = io.BytesIO()
    np.savez(buf, identity=np.array(json.dumps(identity, sort_keys=True)), **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def read_shard(path, identity: dict) -> dict | None:
    """The shard's arrays if the file exists, reads and matches `identity`; else None (it is redone)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            found = json.loads(str(z["identity"]))
            if found != json.loads(json.dumps(identity, sort_keys=True)):
                changed = sorted(k for k in set(found) | set(identity) if found.get(k) != identity.get(k))
                log.info("%s: stale (differs in %s); it is redone", path.name, ", ".join(changed))
                return None
            return {k: z[k] for k in z.files if k != "identity"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("%s: unreadable (%s); it is redone", path.name, e)
        return None


# ----------------------------------------------------------------------------
# A shard task: sample its seeds, extract features, write one file per (steps, seed set).


def _featuresdict(images: torch.Tensor, ref: Reference, layers: list[str], device, batch_size: int = 256):
    """{layer: float32 features} by torch-fidelity's extraction loop (the numbers calculate_metrics sees)."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    cuda = torch.device(device).type == "cuda"
    fe = create_feature_extractor(ref.extractor, list(layers), cuda=cuda, verbose=False,
                                  feature_extractor_weights_path=str(ref.weights_path))
    return get_featuresdict_from_dataset(ImageTensorDataset(images), fe, batch_size, cuda, True, False)


def _moments(features: torch.Tensor) -> dict:
    """n, sum x and sum x x^T in float64: shards add them exactly enough for FID (Heusel et al. 2017)."""
    f = features.detach().cpu().double().numpy()
    return {"n": np.int64(len(f)), "sum_x": f.sum(0), "sum_xx": f.T @ f}


def shard_done(spec: EvalSpec, shard: int, final_digest: str, cfg, ref, dino) -> bool:
    """Whether every file of this shard is present and current."""
    sets = evaluate.seed_set_list(spec.num, spec.seed_sets, spec.first_seed)
    return all(read_shard(shard_path(spec.shard_dir, s, j, shard, spec.shards),
                          shard_identity(final_digest, cfg, spec, s, seeds[shard::spec.shards], ref, dino)) is not None
               for s in spec.steps for j, seeds in enumerate(sets))


def run_shard(spec: EvalSpec, shard: int) -> dict:
    """Task `shard` of `spec.shards`: sample seeds[shard::shards] of each (steps, seed set) and write their shard
    files; files already present and current are kept. Returns {computed, kept, seconds}."""
    from scm.train import load_final

    t0, run_dir, device, final_digest, cfg = _open_run(spec)
    ref, dino = _feature_reference(spec, cfg), _dino_reference(spec, cfg)
    layers = feature_layers(ref, spec.kid, spec.prc)
    net = vae = None
    computed, kept = [], []
    for s in spec.steps:
        for j, seeds in enumerate(evaluate.seed_set_list(spec.num, spec.seed_sets, spec.first_seed)):
            mine = seeds[shard::spec.shards]
            path = shard_path(spec.shard_dir, s, j, shard, spec.shards)
            identity = shard_identity(final_digest, cfg, spec, s, mine, ref, dino)
            if read_shard(path, identity) is not None:
                kept.append(path.name)
                log.info("shard %d/%d steps=%d set %d: kept %s", shard, spec.shards, s, j, path.name)
                continue
            if net is None:  # load the network (and decoder) only when there is work
                net, _ = load_final(run_dir, "ema", device)
                vae = evaluate.load_vae(spec.vae_path, device) if cfg.data.channels == 4 else None
            t1 = time.time()
            images, nfe = evaluate.generate(net, cfg, mine, s, spec.batch, spec.solver, spec.guidance, device, vae)
            t2 = time.time()
            feats = _featuresdict(images, ref, layers, device)
            arrays = {f"feat_{k}": v.float().cpu().numpy() for k, v in feats.items()}
            arrays.update(_moments(feats[metric_layer(ref, "fid")]))
            labels = evaluate.seed_labels(cfg, mine)
            if labels is not None:
                arrays["labels"] = labels.numpy()
                if ref.extractor == extractors.SHAPES_EXTRACTOR:  # the classifier's verdicts, for class accuracy
                    logits = extract_features(images, ref, str(device), layer="logits")
                    arrays["pred"] = logits.argmax(1).cpu().numpy()
            if dino is not None:
                d = _moments(extract_features(images, dino, str(device)))
                arrays.update({"dino_sum_x": d["sum_x"], "dino_sum_xx": d["sum_xx"]})
            t3 = time.time()
            arrays.update({"nfe": np.int64(nfe), "sample_seconds": np.float64(t2 - t1),
                           "metric_seconds": np.float64(t3 - t2), "gpus": np.int64(evaluate.device_count(device)),
                           "threads": np.int64(torch.get_num_threads()), "seeds": np.asarray(mine, np.int64)})
            write_shard(path, identity, arrays)
            computed.append(path.name)
            log.info("shard %d/%d steps=%d set %d: %d samples in %.1f s + features %.1f s -> %s", shard,
                     spec.shards, s, j, len(mine), t2 - t1, t3 - t2, path.name)
    return {"shard": shard, "computed": computed, "kept": kept, "seconds": round(time.time() - t0, 3),
            "host": platform.node()}


# ----------------------------------------------------------------------------
# The reduce step.


def _gather(parts: list[dict], key: str, seeds_total: int) -> np.ndarray:
    """Per-sample rows of all shards back in seed order (shard i held rows i::K): KID's random subsets then
    draw the same rows as in the unsharded evaluation."""
    first = parts[0][key]
    out = np.empty((seeds_total, *first.shape[1:]), dtype=first.dtype)
    for i, p in enumerate(parts):
        out[i::len(parts)] = p[key]
    return out


def _merged_stats(parts: list[dict], prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 from the shards' moments; sigma with ddof = 1 as torch-fidelity and EDM."""
    n = sum(int(p["n"]) for p in parts)
    sum_x = sum(p[f"{prefix}sum_x"] for p in parts)
    sum_xx = sum(p[f"{prefix}sum_xx"] for p in parts)
    mu = sum_x / n
    return mu, (sum_xx - n * np.outer(mu, mu)) / (n - 1)


def fid_from_shards(parts: list[dict], mu_ref, sigma_ref, prefix: str = "") -> float:
    return frechet_distance(*_merged_stats(parts, prefix), mu_ref, sigma_ref)


def _real_featuresdict(ref: Reference, layers: list[str], device: str) -> dict:
    """The real images' features through torch-fidelity's cache (the ones calculate_metrics compares with)."""
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id_cached

    kw = {**_fidelity_kwargs(ref, device, 256), "input2": ImageTensorDataset(ref.images),
          "input2_cache_name": ref.name}
    fe = create_feature_extractor(ref.extractor, layers, **kw)
    return extract_featuresdict_from_input_id_cached(2, fe, **kw)


def set_metrics(parts: list[dict], seeds: list[int], ref: Reference, mu_ref, sigma_ref, spec: EvalSpec,
                device: str, dino_stats=None) -> dict:
    """The metrics of one seed set from its shards, with compute_metrics's keys and conditions."""
    from torch_fidelity import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, KEY_METRIC_PRECISION, KEY_METRIC_RECALL
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    layers, fid_layer = feature_layers(ref, spec.kid, spec.prc), metric_layer(ref, "fid")
    out = {"fid": fid_from_shards(parts, mu_ref, sigma_ref), "kid": None, "kid_sd": None, "precision": None,
           "recall": None, "class_accuracy": None, "fjd": None}
    feats = {k: torch.from_numpy(_gather(parts, f"feat_{k}", len(seeds))) for k in layers}
    if ref.images is not None:
        subset = min(1000, len(seeds), len(ref.images))
        kw = {"kid_subset_size": subset, "kid_subsets": spec.kid_subsets, "verbose": False, "save_cpu_ram": True,
              "cuda": torch.device(device).type == "cuda"}
        real = None
        if (spec.kid and subset >= 2) or (spec.prc and subset > 3):
            real = _real_featuresdict(ref, layers, device)
        if spec.kid and subset >= 2:
            layer = metric_layer(ref, "kid")
            k = kid_features_to_metric(feats[layer], real[layer], **kw)
            out["kid"], out["kid_sd"] = float(k[KEY_METRIC_KID_MEAN]), float(k[KEY_METRIC_KID_STD])
        if spec.prc and subset > 3:  # precision/recall with 3 nearest neighbours
            layer = metric_layer(ref, "prc")
            p = prc_features_to_metric(feats[layer], real[layer], **kw)
            out["precision"], out["recall"] = float(p[KEY_METRIC_PRECISION]), float(p[KEY_METRIC_RECALL])
    if "pred" in parts[0] and ref.extractor == extractors.SHAPES_EXTRACTOR:
        labels = torch.from_numpy(_gather(parts, "labels", len(seeds)))
        pred = torch.from_numpy(_gather(parts, "pred", len(seeds)))
        out["class_accuracy"] = float((pred == labels).double().mean())
        if ref.labels is not None and ref.images is not None:
            out["fjd"] = frechet_joint_distance(feats[fid_layer], labels, ref.real_features, ref.labels,
                                                len(ref_classes(ref)))
    if dino_stats is not None:
        out["fd_dinov2"] = fid_from_shards(parts, *dino_stats, prefix="dino_")
    return out


def reduce_shards(spec: EvalSpec) -> list[dict]:
    """metrics.json entries (scm.evaluate's schema) from the shard files; missing or stale ones are an error
    naming them."""
    t0, run_dir, device, final_digest, cfg = _open_run(spec)
    ref, ref_path, dino = evaluate.references(cfg, spec.extractor, spec.extractor_weights, spec.cache_dir,
                                              spec.ref_stats, spec.dinov2, device)
    mu_ref, sigma_ref, _ = reference_stats(ref, str(device))
    dino_stats = reference_stats(dino, str(device))[:2] if dino is not None else None
    sets = evaluate.seed_set_list(spec.num, spec.seed_sets, spec.first_seed)
    loaded, missing = {}, []
    for s in spec.steps:
        for j, seeds in enumerate(sets):
            for i in range(spec.shards):
                path = shard_path(spec.shard_dir, s, j, i, spec.shards)
                part = read_shard(path, shard_identity(final_digest, cfg, spec, s, seeds[i::spec.shards], ref, dino))
                if part is None:
                    missing.append(path.name)
                loaded[s, j, i] = part
    if missing:
        raise ShardsMissingError(f"{spec.shard_dir}: {len(missing)} shard files missing or stale "
                                 f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); run the "
                                 "evaluation again to compute them")
    entries = []
    for s in spec.steps:
        per_set, t_sample, t_metric, gpus, threads, nfe = [], 0.0, 0.0, 0, 0, 0
        for j, seeds in enumerate(sets):
            t1 = time.time()
            parts = [loaded[s, j, i] for i in range(spec.shards)]
            m = set_metrics(parts, seeds, ref, mu_ref, sigma_ref, spec, str(device), dino_stats)
            per_set.append(m)
            t_sample += sum(float(p["sample_seconds"]) for p in parts)
            t_metric += sum(float(p["metric_seconds"]) for p in parts) + time.time() - t1
            gpus, threads = max(int(p["gpus"]) for p in parts), max(int(p["threads"]) for p in parts)
            nfe = int(parts[0]["nfe"])
            log.info("%s steps=%d seeds %s (%d shards): FID %.4f, class accuracy %s", run_dir.name, s,
                     evaluate.format_seeds(seeds), spec.shards, m["fid"], m["class_accuracy"])
        sampler = evaluate.sampler_spec(cfg, s, spec.solver, spec.guidance)
        entries.append(evaluate.metrics_entry(run_dir, cfg, sampler, nfe, sets, per_set, ref, ref_path,
                                              dino is not None, t_sample, t_metric, device, gpus, threads))
    log.info("reduced %d shard files in %.1f s", len(loaded), time.time() - t0)
    return entries


# ----------------------------------------------------------------------------
# Launching: K shard tasks (only those not done), then the reduce step.


class ShardJob(submitit.helpers.Checkpointable):
    """One array task; on timeout or preemption it is requeued and keeps the shard files it finished."""

    def __init__(self, spec: EvalSpec):
        self.spec = spec

    def __call__(self, shard: int) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run_shard(self.spec, shard)


class ReduceJob:
    def __init__(self, spec: EvalSpec):
        self.spec = spec

    def __call__(self) -> list[dict]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return reduce_shards(self.spec)


class SampleShardJob(submitit.helpers.Checkpointable):
    """One array task of `scm sample --shards K` (PNGs only: the caller writes grid.png)."""

    def __init__(self, kwargs: dict, shards: int):
        self.kwargs, self.shards = kwargs, shards

    def __call__(self, shard: int) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return evaluate.sample_run(**self.kwargs, shard=(shard, self.shards), grid=False)


def pending_shards(spec: EvalSpec) -> list[int]:
    """The shards with a file missing or stale (checked in this process: nothing is submitted for the rest)."""
    cfg = _run_config(spec.run_dir)
    ref, dino = _feature_reference(spec, cfg), _dino_reference(spec, cfg)
    digest = checkpoint_digest(Path(spec.run_dir) / "final.pt")
    return [i for i in range(spec.shards) if not shard_done(spec, i, digest, cfg, ref, dino)]


def _job_folder(base) -> Path:
    return Path(base) / "jobs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _results(jobs, what: str) -> list:
    """Each job's result; a failed one raises LaunchError with the tail of its log."""
    from scm.launch import LaunchError, _tail

    out = []
    for job in jobs:
        try:
            out.append(job.result())
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
            raise LaunchError(f"{what}: job {job.job_id} failed: {str(e).splitlines()[0] if str(e) else e}\n"
                              f"--- last lines of {job.paths.stderr} ---\n{_tail(job.paths.stderr)}") from None
    return out


def _executor(launcher: str, folder: Path, profile, job_name: str):
    from scm.launch import ClusterProfile, make_executor

    return make_executor(launcher, folder, profile or ClusterProfile(), job_name=job_name)


def evaluate_sharded(spec: EvalSpec, launcher: str = "debug", profile=None) -> list[dict]:
    """Run the shard tasks that are not done (debug: in this process; local/slurm: one submitit job array of
    the cluster profile's resources), then the reduce step (as a job of the same profile); the entries."""
    if spec.num < spec.shards:
        raise ValueError(f"--shards: {spec.shards} shards for {spec.num} samples per seed set; use at most --num")
    todo = pending_shards(spec)
    log.info("%s: %d of %d shards to compute (%s), the others kept", Path(spec.run_dir).name, len(todo),
             spec.shards, ",".join(map(str, todo)) or "none")
    if launcher == "debug":
        for i in todo:
            run_shard(spec, i)
        return reduce_shards(spec)
    folder = _job_folder(spec.shard_dir)
    ex = _executor(launcher, folder, profile, f"scm-eval-{Path(spec.run_dir).name}")
    if todo:
        jobs = ex.map_array(ShardJob(spec), todo)
        log.info("submitted %s array %s (%d tasks) for %s", launcher, jobs[0].job_id.split("_")[0], len(jobs),
                 spec.run_dir)
        for info in _results(jobs, f"evaluation shards of {spec.run_dir}"):
            log.info("shard %d on %s: %d files computed, %d kept in %.1f s", info["shard"], info["host"],
                     len(info["computed"]), len(info["kept"]), info["seconds"])
    return _results([ex.submit(ReduceJob(spec))], f"evaluation reduce of {spec.run_dir}")[0]


def sample_sharded(kwargs: dict, shards: int, launcher: str = "debug", profile=None, grid: int = 64) -> dict:
    """`scm sample` over `shards` tasks; grid.png from the first `grid` seeds' PNGs (the same bytes as the
    unsharded grid). kwargs: scm.evaluate.sample_run's (run_dir, steps, seeds, out_dir, ...)."""
    t0 = time.time()
    if launcher == "debug":
        infos = [evaluate.sample_run(**kwargs, shard=(i, shards), grid=False) for i in range(shards)]
    else:
        ex = _executor(launcher, _job_folder(Path(kwargs["out_dir"])), profile,
                       f"scm-sample-{Path(kwargs['run_dir']).name}")
        infos = _results(ex.map_array(SampleShardJob(kwargs, shards), list(range(shards))),
                         f"sampling shards of {kwargs['run_dir']}")
    out_dir, seeds = Path(kwargs["out_dir"]), kwargs["seeds"][:grid]
    if seeds:
        import PIL.Image

        images = [torch.from_numpy(np.array(PIL.Image.open(out_dir / f"{s:06d}.png"))) for s in seeds]
        images = torch.stack([x[:, :, None] if x.ndim == 2 else x for x in images]).permute(0, 3, 1, 2)
        evaluate.write_grid(images, out_dir / "grid.png", limit=grid)
    return {"num": sum(i["num"] for i in infos), "nfe": max(i["nfe"] for i in infos),
            "seconds": round(time.time() - t0, 3), "out_dir": str(out_dir)}
