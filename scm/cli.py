"""The `scm` command line: the only argument parser of the project (docs/architecture.md)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from scm.config import REF_STATS_DIR

log = logging.getLogger("scm")


# ----------------------------------------------------------------------------
# scm info


def cmd_info_sizes(args) -> int:
    from scm.config import check_dataset

    check_dataset(args.dataset, "--dataset")
    from scm.networks import size_table

    rows = size_table(args.dataset)
    print(f"{'size':<6} {'channels':>8} {'params (M)':>11}")
    for r in rows:
        print(f"{r['size']:<6} {r['channels']:>8} {r['params_m']:>11.1f}")
    return 0


def cmd_config_write(args) -> int:
    from scm.config import config_hash, from_dict, to_dict
    from scm.study import write_yaml

    # The pipeline's run.yaml: a resolved config (checked here, once) written atomically as YAML.
    cfg = from_dict(json.loads(args.json))
    write_yaml(to_dict(cfg), args.out)
    print(f"wrote {args.out} (config hash {config_hash(cfg)})")
    return 0


def cmd_config_fields(args) -> int:
    from scm.config import field_docs

    # One line per config field: the key an override, ablation file or sweep names, its default and help.
    print("| key | type | default | choices / range | help |")
    print("|---|---|---|---|---|")
    for r in field_docs():
        limits = ", ".join(map(str, r["choices"])) if r.get("choices") else ""
        if r.get("min") is not None or r.get("max") is not None:
            limits = f"[{r.get('min', '')}, {r.get('max', '')}]".replace("None", "")
        print(f"| `{r['key']}` | {r['type']} | {r['default']!r} | {limits} | {r['help']} |")
    return 0


# ----------------------------------------------------------------------------
# scm train


def load_config(config_file: str, override_files: list[str], sets: list[str]):
    """The resolved config: a YAML study/run file, then override files (ablations, best.yaml), then --set.
    An error names where its key was given: the config file, an override file, or --set."""
    from scm.config import ConfigError, canonical_key, flatten, load_yaml, parse_set, resolve_from_dict

    base = flatten(load_yaml(config_file, "--config"))
    source = {canonical_key(k): f"in {config_file}" for k in base}  # the last layer that gave each key
    overrides: dict = {}
    for f in override_files:
        flat = flatten(load_yaml(f, "--overrides"))
        overrides.update(flat)
        source.update({canonical_key(k): f"in {f}" for k in flat})
    try:
        flat = parse_set(sets)
    except ConfigError as e:
        raise ConfigError(f"--set: {e}") from None
    overrides.update(flat)
    source.update({canonical_key(k): "from --set" for k in flat})
    try:
        return resolve_from_dict(base, overrides)
    except ConfigError as e:
        # a key of a preset (or a cross-field check) has no single source: name every layer given
        where = source.get(canonical_key(e.key or "")) or "in " + ", ".join(
            [str(config_file), *map(str, override_files), *(["--set"] if sets else [])])
        raise ConfigError(f"{e} ({where})", key=e.key) from None


class _Bar:
    """A tqdm bar in steps with a status line (loss, ||g||, sec/kimg) as its postfix."""

    def __init__(self, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, info: dict) -> None:
        self.bar.total = info["total_steps"]
        self.bar.n = info["step"]
        post = {"kimg": f"{info['kimg']:.1f}", "loss": f"{info.get('loss', float('nan')):.4f}"}
        if "g_norm" in info:
            post["|g|"] = f"{info['g_norm']:.3g}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self):
        self.bar.close()


def _watch(job, run_dir: Path, bar: _Bar, poll_s: float) -> None:
    """While a submitted job runs, follow its stats.jsonl on the bar."""
    import time

    stats = run_dir / "stats.jsonl"
    while not job.done():
        if stats.exists():
            lines = stats.read_text().splitlines()
            if lines:
                row = json.loads(lines[-1])
                bar({"total_steps": bar.bar.total or 0, **row})
        time.sleep(poll_s)


def cmd_train(args) -> int:
    from scm import launch
    from scm.checkpoint import read_status
    from scm.config import config_hash, to_dict
    from scm.train import FinalCorruptError, TeacherNotReadyError, TrainingInterrupted, check_teacher, train

    cfg = load_config(args.config, args.overrides, args.set)
    profile = launch.get_profile(args.clusters, args.cluster) if args.cluster else launch.ClusterProfile()
    run_dir = Path(args.run_dir)
    if args.dry_run:
        print("# resolved config")
        print(json.dumps(to_dict(cfg), indent=2))
        print(f"# config hash {config_hash(cfg)}")
        if args.launcher == "slurm":
            print("# sbatch script")
            print(launch.sbatch_script(profile, run_dir.resolve() / "jobs" / "DRY-RUN",
                                       job_name=f"scm-{cfg.run.method}-{cfg.run.size}"))
        return 0
    try:  # sCD's teacher: missing, unfinished or corrupt -> one line, before the run directory exists
        check_teacher(cfg)
    except (TeacherNotReadyError, FinalCorruptError) as e:
        return _user_error(e)
    bar = _Bar(f"{cfg.run.method} {cfg.run.size}")
    try:
        if args.launcher == "debug":
            status = train(cfg, run_dir, progress=bar, on_config_change=args.on_config_change)
        else:
            try:
                job = launch.submit(cfg, run_dir, args.launcher, profile, args.on_config_change)
            except launch.AlreadyCompleted:
                job, status = None, read_status(run_dir)
                print(f"{run_dir}: already completed", file=sys.stderr)
            if job is not None:
                print(f"following {args.launcher} job {job.job_id} (run dir {run_dir})", file=sys.stderr)
                _watch(job, run_dir, bar, args.poll)
                status = launch.wait(job, run_dir, args.poll)
    except TrainingInterrupted as e:  # SIGTERM/Ctrl-C: checkpoint saved at a step boundary
        bar.close()
        print(f"scm: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # a second Ctrl-C, or one while waiting for a job or the run lock
        bar.close()
        print(f"scm: interrupted; {run_dir} resumes from its last checkpoint when run again", file=sys.stderr)
        return 130
    except launch.LaunchError as e:  # a failed job (the message carries its log tail) or no SLURM here
        bar.close()
        print(f"scm: error: {e}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    print(json.dumps(status))
    return 0 if status.get("state") == "completed" else 1


# ----------------------------------------------------------------------------
# scm report


def cmd_report(args) -> int:
    from scm.config import check_dataset

    check_dataset(args.dataset, "--dataset")
    for f in args.metrics:
        if not Path(f).is_file():
            raise UsageError(f"--metrics: {f} not found (run scm evaluate first)")
    from scm.report import build_report

    paths = build_report(args.metrics, args.results, args.dataset, args.reference)
    for p in paths:
        print(p)
    return 0


# ----------------------------------------------------------------------------
# scm bench


def _bench_setup(args) -> str:
    import torch

    from scm.bench import hardware

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    hw = hardware()
    print(f"hardware: {hw}", flush=True)
    return hw


def _bench_write(rows, out: str, hw: str, plot) -> None:
    """CSV at OUT and a PNG next to it (same stem)."""
    from scm.bench import write_csv

    csv_path = write_csv(rows, out, hw)
    png = plot(rows, Path(out).with_suffix(".png"), hw=hw)
    print(f"wrote {csv_path} and {png}")


def _timing_table(rows) -> None:
    mem = any(r.peak_mem_mb is not None for r in rows)
    print(f"{'method':<21} {'size':<5} {'batch':>5} {'params (M)':>10} {'median s':>9} {'min s':>8} {'max s':>8}"
          + (f" {'peak MiB':>9}" if mem else ""))
    for r in rows:
        print(f"{r.method:<21} {r.size:<5} {r.batch:>5} {r.params_m:>10.3f} {r.median_s:>9.4f} "
              f"{r.min_s:>8.4f} {r.max_s:>8.4f}" + (f" {r.peak_mem_mb:>9.1f}" if mem else ""))


def cmd_bench_step(args) -> int:
    from scm.bench import plot_timings, ratios_by_batch, step_benchmark

    hw = _bench_setup(args)
    batches = args.batches or [args.batch]
    rows = step_benchmark(args.sizes, repeats=args.repeats, device=args.device, dataset=args.dataset,
                          batches=batches, memory=not args.no_memory)
    _timing_table(rows)
    if rows[0].memory_kind:
        print(f"peak memory: {rows[0].memory_kind}")
    by = ratios_by_batch(rows)
    for (size, b), rs in by.items():
        for name, value in rs.items():
            print(f"[{size}, batch {b}] {name}: {value:.2f}")
    # the headline lines, for the largest size and the last batch measured (one run)
    last = by.get((args.sizes[-1], batches[-1]), {})
    for name, target in (("sCD/teacher", 1.8), ("sCT/teacher", 1.5)):
        if name in last:
            print(f"{name}: {last[name]:.2f} (target <= {target})")
    _bench_write(rows, args.out, hw, lambda r, p, hw: plot_timings(r, p, "training step", hw))
    print(f"median of {args.repeats} repeats")
    return 0


def _layout(text: str) -> tuple[int, int]:
    """'JxK' (J jobs of K threads, both >= 1) for `scm bench threads --layouts`."""
    jobs, _, threads = text.partition("x")
    if not (jobs.isdigit() and threads.isdigit() and int(jobs) > 0 and int(threads) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not JxK (e.g. 2x1: 2 jobs of 1 thread)")
    return int(jobs), int(threads)


def cmd_bench_threads(args) -> int:
    from scm.bench import thread_layouts, write_csv

    hw = _bench_setup(args)
    rows = thread_layouts(args.layouts, size=args.size, batch=args.batch, mixes=args.mixes, repeats=args.repeats)
    print(f"{'layout':<7} {'mixes':>5} {'median s':>9} {'min s':>8} {'max s':>8} {'mixes/s':>8}")
    for r in rows:
        print(f"{r.layout:<7} {r.mixes:>5} {r.median_s:>9.2f} {r.min_s:>8.2f} {r.max_s:>8.2f} {r.mixes_per_s:>8.3f}")
    base = rows[0]
    for r in rows[1:]:
        print(f"throughput {r.layout} / {base.layout}: {r.mixes_per_s / base.mixes_per_s:.2f}")
    print(f"wrote {write_csv(rows, args.out, hw)}; median of {args.repeats} repeats")
    return 0


def cmd_bench_jvp(args) -> int:
    from scm.bench import jvp_benchmark, jvp_ratios, plot_timings

    hw = _bench_setup(args)
    rows = jvp_benchmark(args.sizes, batch=args.batch, repeats=args.repeats, device=args.device,
                         dataset=args.dataset)
    _timing_table(rows)
    for size, rs in jvp_ratios(rows).items():
        for name, value in rs.items():
            print(f"[{size}] {name}: {value:.2f}")
    _bench_write(rows, args.out, hw, lambda r, p, hw: plot_timings(r, p, "network forward vs JVP (no grad)", hw))
    print(f"median of {args.repeats} repeats")
    return 0


def cmd_bench_attention(args) -> int:
    from scm.bench import attention_benchmark, attention_memory_ratio, plot_attention

    hw = _bench_setup(args)
    rows = attention_benchmark(args.seq, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                               block_size=args.block_size, repeats=args.repeats, device=args.device)
    print(f"{'impl':<14} {'N':>6} {'median s':>9} {'min s':>8} {'max s':>8} {'peak MiB':>9}")
    for r in rows:
        print(f"{r.impl:<14} {r.seq:>6} {r.median_s:>9.4f} {r.min_s:>8.4f} {r.max_s:>8.4f} {r.peak_mem_mb:>9.2f}")
    print(f"peak memory: {rows[0].memory_kind}")
    ratio = attention_memory_ratio(rows)
    if ratio:
        n, fused, value = ratio
        print(f"fused/math peak memory at N={n}: {value:.4f} (target <= 0.25; fused = {fused})")
    _bench_write(rows, args.out, hw, plot_attention)
    print(f"median of {args.repeats} repeats")
    return 0


def cmd_bench_sampling(args) -> int:
    from scm.bench import plot_sampling, sampling_benchmark

    hw = _bench_setup(args)
    rows = sampling_benchmark(args.size, args.nfe, batch=args.batch, repeats=args.repeats, device=args.device,
                              dataset=args.dataset)
    print(f"{'sampler':<7} {'steps':>5} {'NFE':>4} {'images/s':>9} {'min':>9} {'max':>9}")
    for r in rows:
        print(f"{r.sampler:<7} {r.steps:>5} {r.nfe:>4} {r.images_per_s:>9.1f} {r.images_per_s_min:>9.1f} "
              f"{r.images_per_s_max:>9.1f}")
    _bench_write(rows, args.out, hw, plot_sampling)
    print(f"size {args.size}, batch {args.batch}, untrained net, median of {args.repeats} repeats")
    return 0


def cmd_bench_orchestration(args) -> int:
    import subprocess

    from scm.bench import OrchestrationTiming, dag_benchmark, plot_orchestration, slurm_latency_benchmark

    hw = _bench_setup(args)
    rows = [dag_benchmark(args.configfile, args.profile, repeats=args.repeats, snakemake=args.snakemake)]
    dag = rows[0]
    print(f"{Path(args.configfile).stem} DAG: {dag.median_s:.2f} s [{dag.min_s:.2f}, {dag.max_s:.2f}] "
          f"(target <= 5) ({dag.note})")
    brought_up = False
    script = Path(args.cluster_script) if args.cluster_script else None
    if args.bring_up and (script is None or not script.exists()):
        print(f"--bring-up needs --cluster-script PATH (a script with up|down|status), got {script}", file=sys.stderr)
        return 2
    try:
        if args.bring_up:
            if subprocess.run(["bash", str(script), "status"], capture_output=True).returncode != 0:
                print("bringing the test SLURM cluster up", flush=True)
                brought_up = True  # even a failed `up` leaves state that `down` cleans
                subprocess.run(["bash", str(script), "up"], check=False)
        folder = Path(args.out).with_suffix("").with_name("slurm-latency-jobs")
        try:
            lat = slurm_latency_benchmark(folder, jobs=args.jobs)
        except Exception as e:  # a cluster that goes away mid-run: report, keep the DAG number
            lat = OrchestrationTiming("slurm_submit_to_start", None, None, None, 0,
                                      f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        if brought_up:
            subprocess.run(["bash", str(script), "down"], check=False)
    rows.append(lat)
    if lat.median_s is None:
        print(f"SLURM submit-to-start: {lat.note}")
    else:
        print(f"SLURM submit-to-start: {lat.median_s:.2f} s [{lat.min_s:.2f}, {lat.max_s:.2f}] over {lat.repeats} jobs")
    _bench_write(rows, args.out, hw, plot_orchestration)
    return 0


def cmd_bench_overhead(args) -> int:
    from scm.bench.overhead import breakdown

    wall = args.wall
    if wall is None:
        wall_file = Path(args.results) / "benchmarks" / "pipeline-wall.txt"
        if not wall_file.exists():
            print(f"scm: error: --wall: not given and no {wall_file} (written by `make run`)", file=sys.stderr)
            return 2
        wall = float(wall_file.read_text().split()[0])
    b = breakdown(args.results, wall, args.cores)
    print(f"{'rule':<16} {'jobs':>5} {'job s':>9} {'work s':>9} {'overhead s':>11} {'per job':>8}")
    for r in b["rules"]:
        print(f"{r['rule']:<16} {r['jobs']:>5} {r['job_s']:>9.1f} {r['work_s']:>9.1f} {r['overhead_s']:>11.1f} "
              f"{r['overhead_per_job_s']:>8.2f}")
    slots = b["cores"] * b["wall_s"]
    print(f"wall {b['wall_s']:.0f} s x {b['cores']} cores = {slots:.0f} core-s: work {b['work_core_s']:.0f} "
          f"({b['work_core_s'] / slots:.0%}), per-job overhead {b['job_overhead_core_s']:.0f} "
          f"({b['job_overhead_core_s'] / slots:.0%}), idle {b['idle_core_s']:.0f} ({b['idle_core_s'] / slots:.0%})")
    print(f"overhead: {b['overhead_share']:.1%} of the wall clock (target <= 10%), {b['jobs']} jobs")
    if args.out:
        from scm.fileio import atomic_write_json

        atomic_write_json(args.out, b)
    return 0


# ----------------------------------------------------------------------------
# scm sample / scm evaluate / scm data (sampling, metrics, data and weights; scm.evaluate, scm.metrics)


def _user_error(e: Exception) -> int:
    """Missing files, weights or extras: one line that says what to do, exit status 2."""
    message = " ".join(str(e).splitlines())
    print(f"scm: error: {message}", file=sys.stderr)
    return 2


class UsageError(ValueError):
    """A bad command-line value (a count, a path): caught by main() and printed as one line, before any work."""


def _at_least(flag: str, value, minimum) -> None:
    """value >= minimum; NaN and inf are refused (for optional flags, None means the run's own setting)."""
    if value is not None and (not math.isfinite(value) or value < minimum):
        raise UsageError(f"{flag}: expected a finite number >= {minimum}, got {value}")


def _check_creatable(flag: str, path: Path) -> None:
    """`path` does not exist yet: its nearest existing ancestor must be a folder we may write in."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag}: cannot create {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot create {path}: permission denied in {parent}")


def _check_run_dir(flag: str, path: str, create: bool) -> None:
    """A run directory must be a readable folder; `create` (training): writable, or creatable when missing.
    A missing run directory to read from is left to the command (it says to train the run first)."""
    p = Path(path)
    if not p.exists():
        if create:
            _check_creatable(flag, p)
        return
    if not p.is_dir():
        raise UsageError(f"{flag}: {p} is not a directory")
    if not os.access(p, os.R_OK | os.X_OK | (os.W_OK if create else 0)):
        raise UsageError(f"{flag}: {p}: permission denied (needs read{', write' if create else ''} access)")


def _check_out_file(flag: str, path: str) -> None:
    """An output file, written atomically (temporary file + rename): a file or nothing at `path`, in a folder
    we may write in."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag}: {p} is a directory, expected a file name")
    if not p.exists():
        _check_creatable(flag, p)
    elif not os.access(p.parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot write {p}: permission denied in {p.parent}")


def _check_out_dir(flag: str, path: str) -> None:
    """An output folder: a writable folder, or creatable."""
    p = Path(path)
    if not p.exists():
        _check_creatable(flag, p)
    elif not p.is_dir():
        raise UsageError(f"{flag}: {p} is not a directory")
    elif not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot write in {p}: permission denied")


def _set_threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _abs(path):
    """An absolute path (shard tasks may start in another folder), or None."""
    return str(Path(path).resolve()) if path else None


def _eval_profile(args):
    """The cluster profile of an evaluation or sampling job (`--cluster`), checked before any work."""
    from scm import launch

    if args.launcher == "slurm" and not args.cluster:
        raise UsageError("--cluster: the slurm launcher needs a cluster profile name (see --clusters)")
    return launch.get_profile(args.clusters, args.cluster) if args.cluster else launch.ClusterProfile()


def cmd_sample(args) -> int:
    from scm import eval_shards, evaluate
    from scm.launch import LaunchError

    _set_threads(args.threads)
    try:
        _at_least("--steps", args.steps, 1)  # bad counts and paths: before loading the run
        _at_least("--num", args.num, 0)
        _at_least("--batch", args.batch, 1)
        _at_least("--guidance", args.guidance, 0.0)
        _check_out_dir("--out", args.out)
        if not args.seeds and not args.num:
            raise ValueError("give --num N (seeds 0..N-1) or --seeds A-B")
        seeds = evaluate.parse_seeds(args.seeds) if args.seeds else list(range(args.num))
        seeds = seeds[:args.num] if args.num else seeds
        _at_least("--shards", args.shards, 1)
        profile = _eval_profile(args)
        kwargs = dict(run_dir=args.run_dir, steps=args.steps, seeds=seeds, out_dir=args.out, batch=args.batch,
                      solver=args.solver, guidance=args.guidance, device=args.device, vae_path=args.vae)
        if args.shards == 1 and args.launcher == "debug":  # one process: `--shard I/N` as before
            info = evaluate.sample_run(**kwargs, shard=evaluate.parse_shard(args.shard))
        else:
            info = eval_shards.sample_sharded(kwargs, args.shards, args.launcher, profile)
    except (FileNotFoundError, ValueError, ImportError) as e:
        return _user_error(e)
    except LaunchError as e:  # a failed job (the message carries its log tail) or no SLURM here
        print(f"scm: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {info['num']} samples (NFE {info['nfe']}) to {info['out_dir']} in {info['seconds']:.1f} s")
    return 0


def cmd_evaluate(args) -> int:
    from scm import eval_shards, evaluate
    from scm.launch import LaunchError

    _set_threads(args.threads)
    try:
        for steps in args.steps:  # bad counts and paths: before loading the run and sampling
            _at_least("--steps", steps, 1)
        _at_least("--num", args.num, 1)
        _at_least("--seed-sets", args.seed_sets, 1)
        _at_least("--first-seed", args.first_seed, 0)
        _at_least("--batch", args.batch, 1)
        _at_least("--kid-subsets", args.kid_subsets, 1)
        _at_least("--guidance", args.guidance, 0.0)
        _check_out_file("--out", args.out)
        _at_least("--shards", args.shards, 1)
        if args.shards > args.num:
            raise UsageError(f"--shards: {args.shards} shards for --num {args.num} samples; use at most --num")
        profile = _eval_profile(args)
        if args.shards == 1 and args.launcher == "debug":  # one process, no shard files: as before
            entries = evaluate.evaluate_run(
                args.run_dir, args.steps, num=args.num, seed_sets=args.seed_sets, first_seed=args.first_seed,
                batch=args.batch, solver=args.solver, guidance=args.guidance, extractor=args.extractor,
                extractor_weights=args.extractor_weights, cache_dir=args.cache_dir, ref_stats=args.ref_stats,
                dinov2=args.dinov2, kid=not args.no_kid, prc=not args.no_prc, kid_subsets=args.kid_subsets,
                device=args.device, vae_path=args.vae)
        else:  # K shard tasks (resumable shard files under OUT.shards/), then the reduce step
            spec = eval_shards.EvalSpec(
                run_dir=str(Path(args.run_dir).resolve()), steps=list(args.steps),
                shard_dir=str(Path(f"{args.out}.shards").resolve()), shards=args.shards, num=args.num,
                seed_sets=args.seed_sets, first_seed=args.first_seed, batch=args.batch, solver=args.solver,
                guidance=args.guidance, extractor=args.extractor, extractor_weights=_abs(args.extractor_weights),
                cache_dir=str(Path(args.cache_dir).resolve()), ref_stats=_abs(args.ref_stats),
                dinov2=_abs(args.dinov2), kid=not args.no_kid, prc=not args.no_prc, kid_subsets=args.kid_subsets,
                device=args.device, vae_path=_abs(args.vae), threads=args.threads)
            entries = eval_shards.evaluate_sharded(spec, args.launcher, profile)
    except (FileNotFoundError, ValueError, ImportError) as e:
        return _user_error(e)
    # a failed job (with its log tail), no SLURM here, shards missing
    except (LaunchError, eval_shards.ShardsMissingError) as e:
        print(f"scm: error: {' '.join(str(e).splitlines()[:1])}", file=sys.stderr)
        print("\n".join(str(e).splitlines()[1:]), file=sys.stderr)
        return 1
    out = evaluate.write_metrics(entries, args.out)
    fmt = lambda v: "-" if v is None else f"{v:.4g}"
    print(f"{'run':<20} {'steps':>5} {'NFE':>4} {'FID min':>9} {'FID mean':>9} {'sd':>7} {'class acc':>9} "
          f"{'sd':>6} {'FJD mean':>9} {'KID':>9} {'prec':>5} {'rec':>5}")
    for e in entries:
        print(f"{e['run_id']:<20} {e['steps']:>5} {e['nfe']:>4} {fmt(e['fid_min']):>9} {fmt(e['fid_mean']):>9} "
              f"{fmt(e['fid_sd']):>7} {fmt(e['class_accuracy_mean']):>9} {fmt(e['class_accuracy_sd']):>6} "
              f"{fmt(e['fjd_mean']):>9} {fmt(e['kid']):>9} {fmt(e['precision']):>5} {fmt(e['recall']):>5}")
    print(f"extractor {entries[0]['feature_extractor']}, reference {entries[0]['ref_stats']}; wrote {out}")
    return 0


def cmd_data_fetch(args) -> int:
    from scm.data import fetch_cifar10

    print(f"CIFAR-10 in {fetch_cifar10(args.root)}")
    return 0


def cmd_data_fetch_weights(args) -> int:
    from scm import extractors
    from scm.fileio import file_fingerprint

    fetch = {"inception": extractors.fetch_inception_weights, "dinov2": extractors.fetch_dinov2_weights}[args.what]
    out = fetch(args.out)
    print(f"wrote {out} (sha256[:16] {file_fingerprint(out)}); pass it as --extractor-weights / --dinov2")
    return 0


def _write_record(path, record: dict) -> None:
    if path:
        from scm.fileio import atomic_write_json

        atomic_write_json(path, record)


def cmd_data_build_extractor(args) -> int:
    from scm import extractors
    from scm.shapes import SHAPES_VERSIONS

    if args.shapes_version not in SHAPES_VERSIONS:
        return _user_error(ValueError(f"--shapes-version: unknown version {args.shapes_version}; "
                                      f"choose one of {sorted(SHAPES_VERSIONS)}"))
    try:
        _at_least("--steps", args.steps, 1)
    except ValueError as e:
        return _user_error(e)
    out = Path(args.out or extractors.shapes_extractor_path(args.shapes_version))
    if out.exists() and not args.force:
        try:
            meta = extractors.load_shapes_extractor(out, args.shapes_version)[1]
        except ValueError as e:
            return _user_error(ValueError(f"{e} (or --force retrains)"))
        print(f"{out} exists (test accuracy {meta['test_accuracy']:.4f}); --force retrains")
        _write_record(args.record, {**meta, "train_seconds": 0.0, "job_seconds": 0.0, "reused": True})
        return 0
    meta = extractors.train_shapes_extractor(out, args.shapes_version, steps=args.steps)
    _write_record(args.record, meta)  # the training's record, timings included (the artifact's bytes have none)
    print(f"wrote {out}: {meta['name']} on shapes version {meta['shapes_version']}, test accuracy "
          f"{meta['test_accuracy']:.4f} and reconstruction RMSE {meta['test_recon_rmse']:.4f} on "
          f"{meta['test_images']} held-out images, {meta['job_seconds']:.1f} s")
    return 0


def cmd_data_calibrate(args) -> int:
    from scm import calibration, evaluate

    _set_threads(args.threads)
    try:
        _at_least("--num", args.num, 2)
        _at_least("--ref-images", args.ref_images, 2)
        _at_least("--seed-sets", args.seed_sets, 1)
        runs = []
        for spec in args.run or []:
            label, sep, rest = spec.partition("=")
            run_dir, sep2, steps = rest.rpartition(":")
            if not (sep and sep2 and steps.isdigit() and int(steps) >= 1):
                raise ValueError(f"--run: expected LABEL=RUN_DIR:STEPS, got {spec!r}")
            runs.append((label, run_dir, int(steps)))
        rows = calibration.calibrate(args.extractor_weights, args.shapes_version, args.num, args.ref_images,
                             args.seed_sets, runs, cache_dir=args.cache_dir,
                             device=str(evaluate.resolve_device(args.device)))
    except (FileNotFoundError, ValueError, ImportError) as e:
        return _user_error(e)
    table = calibration.markdown_table(rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    print(table, end="")
    return 0


def cmd_data_ref_stats(args) -> int:
    from scm import evaluate, metrics
    from scm.config import DataConfig, from_dict

    try:
        if args.run_dir:
            data_cfg = from_dict(json.loads((Path(args.run_dir) / "config.json").read_text())).data
        elif args.dataset:
            data_cfg = DataConfig(name=args.dataset, path=args.path, num_images=args.num_images,
                                  resolution=args.resolution)
        else:
            raise ValueError("give --dataset NAME (with --path for files) or --run-dir DIR")
        images = evaluate.real_images(data_cfg)
        ref = metrics.make_reference(data_cfg.name, images, args.extractor, args.extractor_weights, args.cache_dir,
                                     shapes_version=data_cfg.shapes_version if data_cfg.name == "shapes" else None)
        mu, sigma, cached = metrics.reference_stats(ref, str(evaluate.resolve_device(args.device)))
    except (FileNotFoundError, ValueError, ImportError) as e:
        return _user_error(e)
    meta = metrics.load_ref_stats(cached)[2]
    metrics.save_ref_stats(args.out, mu, sigma, meta)
    print(f"{ref.name}: {len(images)} images, {mu.shape[0]}-d features; wrote {args.out} (cache {cached})")
    return 0


# ----------------------------------------------------------------------------
# scm sweep (Optuna; scm.sweep)


def cmd_sweep(args) -> int:
    from scm import launch, sweep
    from scm.sweep_spec import load_spec

    spec = load_spec(args.sweep_file, n_trials=args.n_trials, storage=args.storage)
    profile = launch.get_profile(args.clusters, args.cluster) if args.cluster else None
    out = Path(args.out or f"results/sweeps/{spec.name}")
    def counts(summary: dict) -> None:
        left = "".join(f", {summary[k]} {k}" for k in ("running", "waiting") if summary[k])  # killed workers'
        print(f"study {summary['study']}: {summary['trials']} trials ({summary['complete']} complete, "
              f"{summary['pruned']} pruned, {summary['fail']} failed{left}) in {summary['seconds']:.1f} s; storage "
              f"{summary['storage']}")

    try:
        summary = sweep.run_sweep(spec, out, workers=args.workers, launcher=args.launcher, profile=profile,
                                  figures=args.figures, restart=args.restart)
    except (sweep.SweepError, FileNotFoundError, ImportError) as e:
        if getattr(e, "summary", None):
            counts(e.summary)
        return _user_error(e)
    counts(summary)
    print(f"best: trial {summary['best_trial']}, value {summary['best_value']:.6g}, params {summary['best_params']}")
    print(f"wrote {summary['best_yaml']}, {summary['trials_csv']} and {len(summary['figures'])} figures")
    for e in summary["worker_errors"]:
        print(f"warning: {e}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (unknown choice, bad type, missing argument) are one line like every other bad
    input; the sub-command parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"scm: error: {' '.join(message.splitlines())} (usage: {self.prog} --help)\n")


# ----------------------------------------------------------------------------
# scm exact: the exact-answer study on a Gaussian mixture (docs/gmm-study.md)


def cmd_exact(args) -> int:
    import torch

    from scm import exact, exact_report, exact_study
    from scm.config import load_yaml
    from scm.fileio import atomic_write_json

    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec) if args.spec.lstrip().startswith("{") else load_yaml(args.spec, "--spec")
    if args.what == "reference":
        ref, floors = exact.reference_from_spec(spec)
        exact.save_reference({**ref, "floors": floors}, args.out)
        print(f"wrote {args.out}: {len(ref['noise'])} noises, times {[round(t, 4) for t in ref['times']]}, "
              f"floors {json.dumps({k: round(v, 4) for k, v in floors.items()})}")
    elif args.what == "train":  # a training group (ExactStudy.group_spec) or one job (ExactStudy.job)
        ref = exact.load_reference(args.reference)
        result = exact_study.run_group(spec, ref) if "jobs" in spec else exact_study.run_job(spec, ref)
        atomic_write_json(Path(args.out), result)
        for run in (r for job in result.get("jobs", [result]) for r in job["runs"]):
            m = run["metrics"]
            print(f"{run['run_id']}: one-step error {m['err_T']:.4f}, SW 2-step {m['sw_2step']:.4f}, "
                  f"coverage TV {m['tv_2step']:.3f}")
        print(f"wrote {args.out}")
    elif args.what == "map2d":
        for path in exact_report.map2d(spec, args.out):
            print(f"wrote {path}")
    else:
        ref = exact.load_reference(args.reference)
        for path in exact_report.build_exact_report(spec, args.metrics, ref, args.out):
            print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------
# scm serve


def cmd_serve(args) -> int:
    from scm import forkserver

    if Path(args.socket).exists():
        raise UsageError(f"--socket: {args.socket} exists (another server, or a stale one: remove it)")
    preload = tuple(m for m in args.preload.split(",") if m) if args.preload is not None else forkserver.PRELOAD
    forkserver.serve(args.socket, preload)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="scm", description="Continuous-time consistency models (sCM): "
                                "train, sample, evaluate, benchmark.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="facts about models and configs").add_subparsers(dest="what", required=True)
    sizes = info.add_parser("sizes", help="model sizes with parameter counts (counted on the meta device)")
    sizes.add_argument("--dataset", default="imagenet512")
    sizes.set_defaults(func=cmd_info_sizes)

    serve = sub.add_parser("serve", help="fork server: imports torch once, then runs each `scm` command whose "
                           "environment sets SCM_SERVER=SOCKET in a forked child (make run starts one)")
    serve.add_argument("--socket", required=True, help="Unix socket path to listen on")
    serve.add_argument("--preload", default=None,
                       help="comma-separated modules to import first (default: torch, torch_fidelity, scm's)")
    serve.set_defaults(func=cmd_serve)

    conf = sub.add_parser("config", help="run configurations").add_subparsers(dest="what", required=True)
    fields = conf.add_parser("fields", help="every config field: key, type, default, choices, help (Markdown)")
    fields.set_defaults(func=cmd_config_fields)
    cw = conf.add_parser("write", help="write a resolved config (JSON, as the pipeline passes it) as run YAML")
    cw.add_argument("--json", required=True, help="the config as a JSON object (all sections)")
    cw.add_argument("--out", required=True)
    cw.set_defaults(func=cmd_config_write)

    tr = sub.add_parser("train", help="train a teacher, sCT or sCD model (resumable: run it again)")
    tr.add_argument("--config", required=True, help="YAML: dataset, size, method and config overrides")
    tr.add_argument("--run-dir", required=True)
    tr.add_argument("--overrides", nargs="*", default=[], help="more YAML override files (ablations, best.yaml)")
    tr.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, applied last")
    tr.add_argument("--launcher", choices=["debug", "local", "slurm"], default="debug",
                    help="debug: in this process; local: a submitit subprocess; slurm: a SLURM job")
    tr.add_argument("--cluster", default="", help="cluster profile name (see --clusters)")
    tr.add_argument("--clusters", default="config/clusters.yaml", help="cluster profiles file")
    tr.add_argument("--poll", type=float, default=5.0, help="seconds between job status checks")
    tr.add_argument("--dry-run", action="store_true", help="print the resolved config and sbatch script only")
    tr.add_argument("--on-config-change", choices=["error", "restart"], default="error",
                    help="when RUN_DIR holds a run of another config: stop (error) or start it afresh (restart)")
    tr.set_defaults(func=cmd_train)

    rep = sub.add_parser("report", help="tables and figures of a study from its metrics files")
    rep.add_argument("--metrics", nargs="+", required=True, help="metrics JSON files from scm evaluate")
    rep.add_argument("--results", default="results", help="the study's results folder (runs/, samples/)")
    rep.add_argument("--dataset", required=True, help="the study's dataset (paper numbers where it is one)")
    rep.add_argument("--reference", default="resources/paper-tables.csv", help="the paper's numbers")
    rep.set_defaults(func=cmd_report)

    bench = sub.add_parser("bench", help="benchmarks (median of repeats, hardware stated)")
    bsub = bench.add_subparsers(dest="what", required=True)
    step = bsub.add_parser("step", help="training-step time and peak memory of teacher, sCT and sCD")
    step.add_argument("--sizes", nargs="+", default=["tS", "tM", "tL"])
    step.add_argument("--dataset", default="shapes")
    step.add_argument("--batch", type=int, default=64)
    step.add_argument("--batches", type=int, nargs="+", default=None, help="sweep batch sizes (replaces --batch)")
    step.add_argument("--repeats", type=int, default=7)
    step.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    step.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    step.add_argument("--device", default="cpu")
    step.add_argument("--out", default="results/bench/step.csv", help="CSV; the PNG goes next to it")
    step.set_defaults(func=cmd_bench_step)

    thr = bsub.add_parser("threads", help="J jobs x K threads for the study's mix (teacher + sCD steps): "
                                          "throughput of each layout doing the same work")
    thr.add_argument("--layouts", nargs="+", type=_layout, default=[(2, 1), (1, 2)],
                     help="JxK: J concurrent jobs, K threads each")
    thr.add_argument("--size", default="tS")
    thr.add_argument("--batch", type=int, default=32)
    thr.add_argument("--mixes", type=int, default=20, help="teacher + sCD step pairs per job of the widest layout")
    thr.add_argument("--repeats", type=int, default=3)
    thr.add_argument("--out", default="results/bench/threads.csv")
    thr.set_defaults(func=cmd_bench_threads)

    jvp = bsub.add_parser("jvp", help="network forward vs forward_with_tangent vs torch.func.jvp vs the float64 "
                                      "finite difference (no grad)")
    jvp.add_argument("--sizes", nargs="+", default=["tS", "tM", "tL"])
    jvp.add_argument("--dataset", default="shapes")
    jvp.add_argument("--batch", type=int, default=64)
    jvp.add_argument("--repeats", type=int, default=7)
    jvp.add_argument("--threads", type=int, default=0)
    jvp.add_argument("--device", default="cpu")
    jvp.add_argument("--out", default="results/bench/jvp.csv")
    jvp.set_defaults(func=cmd_bench_jvp)

    att = bsub.add_parser("attention", help="math vs blockwise/fused attention JVP: time and peak memory vs N")
    att.add_argument("--seq", type=int, nargs="+", default=[256, 1024, 4096])
    att.add_argument("--batch", type=int, default=1)
    att.add_argument("--heads", type=int, default=4)
    att.add_argument("--head-dim", type=int, default=64)
    att.add_argument("--block-size", type=int, default=64, help="blockwise block size (network.attn_block_size)")
    att.add_argument("--repeats", type=int, default=3)
    att.add_argument("--threads", type=int, default=0)
    att.add_argument("--device", default="cpu")
    att.add_argument("--out", default="results/bench/attention.csv")
    att.set_defaults(func=cmd_bench_attention)

    sam = bsub.add_parser("sampling", help="images/s of consistency and teacher sampling (untrained net)")
    sam.add_argument("--size", default="tS")
    sam.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    sam.add_argument("--dataset", default="shapes")
    sam.add_argument("--batch", type=int, default=64)
    sam.add_argument("--repeats", type=int, default=5)
    sam.add_argument("--threads", type=int, default=0)
    sam.add_argument("--device", default="cpu")
    sam.add_argument("--out", default="results/bench/sampling.csv")
    sam.set_defaults(func=cmd_bench_sampling)

    orc = bsub.add_parser("orchestration", help="snakemake DAG construction time; SLURM submit-to-start latency")
    orc.add_argument("--configfile", default="config/imagenet512.yaml")
    orc.add_argument("--profile", default="profiles/slurm")
    orc.add_argument("--snakemake", default=None, help="snakemake executable (default: next to this Python)")
    orc.add_argument("--repeats", type=int, default=3)
    orc.add_argument("--jobs", type=int, default=5, help="SLURM jobs for the latency measurement")
    orc.add_argument("--cluster-script", default=None,
                     help="script with up/down/status for --bring-up (the checkout's test cluster script)")
    orc.add_argument("--bring-up", action="store_true",
                     help="bring the --cluster-script cluster up if it is down (and down again at the end)")
    orc.add_argument("--out", default="results/bench/orchestration.csv")
    orc.set_defaults(func=cmd_bench_orchestration)
    ovh = bsub.add_parser("overhead", help="a finished pipeline's wall time: work the runs report vs overhead")
    ovh.add_argument("--results", default="results", help="the study's results folder (benchmarks/, runs/)")
    ovh.add_argument("--wall", type=float, default=None,
                     help="the pipeline's wall seconds (default: RESULTS/benchmarks/pipeline-wall.txt)")
    ovh.add_argument("--cores", type=int, default=2, help="cores the pipeline ran with (snakemake --cores)")
    ovh.add_argument("--out", default=None, help="also write the breakdown as JSON")
    ovh.set_defaults(func=cmd_bench_overhead)

    smp = sub.add_parser("sample", help="generate PNGs from a finished run's EMA network (deterministic per seed)")
    smp.add_argument("--run-dir", required=True)
    smp.add_argument("--steps", type=int, required=True,
                     help="consistency steps (sct/scd runs) or teacher solver steps (teacher runs)")
    smp.add_argument("--num", type=int, default=0, help="seeds 0..N-1 (or the first N of --seeds)")
    smp.add_argument("--seeds", default="", help="e.g. 0-49999 or 0,5,7-9 (inclusive ranges)")
    smp.add_argument("--out", required=True, help="folder for {seed:06d}.png and grid.png")
    smp.add_argument("--shard", default="0/1", help="I/N: take every N-th seed from the I-th (SLURM arrays)")
    smp.add_argument("--batch", type=int, default=64, help="network batch size (every call is a full batch)")
    smp.add_argument("--solver", choices=["euler", "heun", "dpm2s"], default=None,
                     help="teacher solver (default: the run's sampler.teacher_solver)")
    smp.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the run's sampler.guidance)")
    smp.add_argument("--vae", default=None, help="local SD VAE folder to decode latents (imagenet512)")
    smp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    smp.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    smp.add_argument("--launcher", choices=["debug", "local", "slurm"], default="debug",
                    help="debug: in this process; local: submitit subprocesses; slurm: a SLURM job array")
    smp.add_argument("--cluster", default="", help="cluster profile name (see --clusters): the jobs' resources")
    smp.add_argument("--clusters", default="config/clusters.yaml", help="cluster profiles file")
    smp.add_argument("--shards", type=int, default=1, help="tasks: seeds[i::K] each; grid.png from the first 64 seeds")
    smp.set_defaults(func=cmd_sample)

    ev = sub.add_parser("evaluate", help="FID (min/mean/sd over seed sets), KID, precision/recall -> metrics.json")
    ev.add_argument("--run-dir", required=True)
    ev.add_argument("--steps", type=int, nargs="+", required=True, help="one entry per value, e.g. --steps 1 2")
    ev.add_argument("--num", type=int, default=1024, help="samples per seed set")
    ev.add_argument("--seed-sets", type=int, default=1, help="seed set j uses seeds first_seed + [j N, (j+1) N)")
    ev.add_argument("--first-seed", type=int, default=0)
    ev.add_argument("--out", default="metrics.json", help="a JSON list, one entry per --steps value")
    ev.add_argument("--batch", type=int, default=64)
    ev.add_argument("--solver", choices=["euler", "heun", "dpm2s"], default=None)
    ev.add_argument("--guidance", type=float, default=None)
    ev.add_argument("--extractor", default=None,
                    help="scm-shapes-v3 (default for shapes) or inception-v3-compat (default otherwise)")
    ev.add_argument("--extractor-weights", default=None,
                    help="local weights: the shapes artifact (trained if missing) or the Inception file")
    ev.add_argument("--cache-dir", default=REF_STATS_DIR, help="reference statistics and features")
    ev.add_argument("--ref-stats", default=None, help="imported reference statistics (EDM .npz / EDM2 .pkl)")
    ev.add_argument("--dinov2", default=None, help="local DINOv2 model file: adds fd_dinov2")
    ev.add_argument("--no-kid", action="store_true")
    ev.add_argument("--no-prc", action="store_true")
    ev.add_argument("--kid-subsets", type=int, default=100)
    ev.add_argument("--vae", default=None)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ev.add_argument("--launcher", choices=["debug", "local", "slurm"], default="debug",
                    help="debug: in this process; local: submitit subprocesses; slurm: a SLURM job array")
    ev.add_argument("--cluster", default="", help="cluster profile name (see --clusters): the jobs' resources")
    ev.add_argument("--clusters", default="config/clusters.yaml", help="cluster profiles file")
    ev.add_argument("--shards", type=int, default=1,
                    help="tasks: seeds[i::K] of every seed set each; OUT.shards/ keeps finished shards on a re-run")
    ev.set_defaults(func=cmd_evaluate)

    data = sub.add_parser("data", help="datasets, feature-extractor weights, reference statistics")
    dsub = data.add_subparsers(dest="what_data", required=True)
    fetch = dsub.add_parser("fetch", help="download a dataset (needs internet: the login node)")
    fetch.add_argument("dataset", choices=["cifar10"])
    fetch.add_argument("--root", required=True)
    fetch.set_defaults(func=cmd_data_fetch)
    fw = dsub.add_parser("fetch-weights", help="download extractor weights once (the only downloading command)")
    fw.add_argument("what", choices=["inception", "dinov2"])
    fw.add_argument("--out", required=True, help="inception: .pth; dinov2: TorchScript .pt or torch.export .pt2")
    fw.set_defaults(func=cmd_data_fetch_weights)
    be = dsub.add_parser("build-extractor", help="train the shapes feature network (deterministic, ~1 min)")
    be.add_argument("--shapes-version", type=int, default=1, help="renderer version (data.shapes_version)")
    be.add_argument("--out", default=None,
                    help="default results/artifacts/shapes-features-v{extractor}-data{shapes version}.pt")
    be.add_argument("--steps", type=int, default=600)
    be.add_argument("--force", action="store_true")
    be.add_argument("--record", default=None,
                    help="also write the training's record as JSON: accuracy, settings, train_seconds (the loop)")
    be.set_defaults(func=cmd_data_build_extractor)
    cal = dsub.add_parser("calibrate", help="the shapes metrics' calibration table: real vs real, degradations, "
                          "runs (docs/metrics.md)")
    cal.add_argument("--shapes-version", type=int, default=1, help="renderer version (data.shapes_version)")
    cal.add_argument("--extractor-weights", default=None, help="default: the version's artifact (trained if missing)")
    cal.add_argument("--num", type=int, default=512, help="images per seed set (the study's eval.num_samples)")
    cal.add_argument("--ref-images", type=int, default=2048, help="reference set size (the study's data.num_images)")
    cal.add_argument("--seed-sets", type=int, default=3)
    cal.add_argument("--run", action="append", help="LABEL=RUN_DIR:STEPS: a run's samples as a row (repeatable)")
    cal.add_argument("--cache-dir", default=REF_STATS_DIR)
    cal.add_argument("--out", default=None, help="also write the markdown table here")
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    cal.set_defaults(func=cmd_data_calibrate)
    rs = dsub.add_parser("ref-stats", help="reference statistics (EDM .npz with mu, sigma) of a dataset")
    rs.add_argument("--dataset", default=None, choices=["shapes", "cifar10", "zip", "imagenet64"])
    rs.add_argument("--path", default="", help="CIFAR-10 root or EDM2 ZIP")
    rs.add_argument("--num-images", type=int, default=2048, help="shapes: size of the set")
    rs.add_argument("--resolution", type=int, default=16, help="shapes: image size")
    rs.add_argument("--run-dir", default=None, help="use this run's data config instead of --dataset")
    rs.add_argument("--out", required=True)
    rs.add_argument("--extractor", default=None)
    rs.add_argument("--extractor-weights", default=None)
    rs.add_argument("--cache-dir", default=REF_STATS_DIR)
    rs.add_argument("--device", default="auto")
    rs.set_defaults(func=cmd_data_ref_stats)

    sw = sub.add_parser("sweep", help="Optuna sweep: N workers on one study -> best.yaml, trials.csv, figures "
                        "(resumable: run it again)")
    sw.add_argument("--sweep-file", required=True, help="sweep file (config/sweeps/*.yaml): space, base run, objective")
    sw.add_argument("--workers", type=int, default=1, help="workers optimizing the study concurrently")
    sw.add_argument("--launcher", choices=["debug", "local", "slurm"], default="local",
                    help="debug: one worker in this process; local: subprocesses; slurm: a job array")
    sw.add_argument("--cluster", default="", help="cluster profile name for slurm (see --clusters)")
    sw.add_argument("--clusters", default="config/clusters.yaml", help="cluster profiles file")
    sw.add_argument("--out", default=None, help="output folder (default results/sweeps/<study name>)")
    sw.add_argument("--figures", default=None, help="plots folder (default: the study's 'figures' or OUT/figures)")
    sw.add_argument("--n-trials", type=int, default=None, help="trial budget (overrides the sweep file)")
    sw.add_argument("--storage", default=None, help="journal file or RDB URL (overrides the sweep file)")
    sw.add_argument("--restart", action="store_true",
                    help="the sweep file changed, or the journal lost the study: move the old journal and "
                    "outputs aside and start afresh")
    sw.set_defaults(func=cmd_sweep)

    ex = sub.add_parser("exact", help="the exact-answer study on a Gaussian mixture (used by the pipeline)")
    ex.add_argument("what", choices=["reference", "train", "map2d", "report"],
                    help="reference: fixed noises + exact ODE solution; train: train and score every seed of the "
                         "techniques of one group; map2d: the 2-D picture; report: table and figures")
    ex.add_argument("--spec", required=True,
                    help="the step's spec: inline JSON (what the pipeline passes) or a YAML file")
    ex.add_argument("--reference", help="reference.pt from `scm exact reference` (train, report)")
    ex.add_argument("--metrics", nargs="*", default=[], help="job results from `scm exact train` (report)")
    ex.add_argument("--out", required=True, help="output file (reference, train, map2d) or results folder (report)")
    ex.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ex.set_defaults(func=cmd_exact)
    return p


def main(argv: list[str] | None = None) -> int:
    """The `scm` entry point: through the fork server when SCM_SERVER names one (scm.forkserver), else here."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != ["serve"]:
        from scm import forkserver

        code, note = forkserver.delegate([sys.argv[0], *argv])
        if note:
            print(f"scm: {note}", file=sys.stderr)
        if code is not None:
            return code
    return run(argv)


def run(argv: list[str]) -> int:
    """Run one `scm` command in this process."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from scm.config import ConfigError

    try:
        # a run directory that is a file or unreadable: one line before the command starts
        if getattr(args, "run_dir", None):
            _check_run_dir("--run-dir", args.run_dir, create=args.command == "train")
        return args.func(args)
    except (ConfigError, UsageError) as e:
        return _user_error(e)


if __name__ == "__main__":
    sys.exit(main())
