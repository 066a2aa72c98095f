"""The `scm` command line: the only argument parser of the project (architecture.md)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("scm")


# ----------------------------------------------------------------------------
# scm info


def cmd_info_sizes(args) -> int:
    from scm.networks import size_table

    rows = size_table(args.dataset)
    print(f"{'size':<6} {'channels':>8} {'params (M)':>11}")
    for r in rows:
        print(f"{r['size']:<6} {r['channels']:>8} {r['params_m']:>11.1f}")
    return 0


# ----------------------------------------------------------------------------
# scm train


def load_config(config_file: str, override_files: list[str], sets: list[str]):
    """The resolved config: a YAML study/run file, then override files (ablations, best.yaml), then --set."""
    import yaml

    from scm import config as C

    path = Path(config_file)
    if not path.exists():
        raise C.ConfigError(f"--config: {path} not found")
    base = yaml.safe_load(path.read_text()) or {}
    overrides: dict = {}
    for f in override_files:
        if not Path(f).exists():
            raise C.ConfigError(f"--overrides: {f} not found")
        overrides.update(C.flatten(yaml.safe_load(Path(f).read_text()) or {}))
    overrides.update(C.parse_set(sets))
    try:
        return C.resolve_from_dict(base, overrides)
    except C.ConfigError as e:
        raise C.ConfigError(f"{e} (in {path}{', ' + ', '.join(override_files) if override_files else ''})") from None


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
    from scm import config as C
    from scm import launch

    cfg = load_config(args.config, args.overrides, args.set)
    profile = launch.get_profile(args.clusters, args.cluster) if args.cluster else launch.ClusterProfile()
    run_dir = Path(args.run_dir)
    if args.dry_run:
        print("# resolved config")
        print(json.dumps(C.to_dict(cfg), indent=2))
        print(f"# config hash {C.config_hash(cfg)}")
        if args.launcher == "slurm":
            print("# sbatch script")
            print(launch.sbatch_script(profile, run_dir.resolve() / "jobs" / "DRY-RUN",
                                       job_name=f"scm-{cfg.run.method}-{cfg.run.size}"))
        return 0
    bar = _Bar(f"{cfg.run.method} {cfg.run.size}")
    try:
        from scm.train import prepare_run_dir, train

        run_dir.mkdir(parents=True, exist_ok=True)
        status = prepare_run_dir(cfg, run_dir, args.on_config_change)
        if status.get("state") == "completed":
            print(f"{run_dir}: already completed", file=sys.stderr)
        elif args.launcher == "debug":
            status = train(cfg, run_dir, progress=bar, on_config_change=args.on_config_change)
        else:
            job = launch.submit(cfg, run_dir, args.launcher, profile, args.on_config_change)
            print(f"submitted {args.launcher} job {job.job_id} (run dir {run_dir})", file=sys.stderr)
            _watch(job, run_dir, bar, args.poll)
            status = launch.wait(job, run_dir, args.poll)
    finally:
        bar.close()
    print(json.dumps(status))
    return 0 if status.get("state") == "completed" else 1


# ----------------------------------------------------------------------------
# scm bench


def cmd_bench_step(args) -> int:
    import torch

    from scm.bench import hardware, ratios, step_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"hardware: {hardware()}", flush=True)
    rows = step_benchmark(args.sizes, batch=args.batch, repeats=args.repeats, device=args.device,
                          dataset=args.dataset)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*dataclasses.asdict(rows[0]), "hardware"])
        w.writeheader()
        for r in rows:
            w.writerow({**dataclasses.asdict(r), "hardware": hardware()})
    print(f"{'method':<8} {'size':<5} {'batch':>5} {'params (M)':>10} {'median s':>9} {'min s':>8} {'max s':>8}")
    for r in rows:
        print(f"{r.method:<8} {r.size:<5} {r.batch:>5} {r.params_m:>10.3f} {r.median_s:>9.4f} "
              f"{r.min_s:>8.4f} {r.max_s:>8.4f}")
    for size, rs in ratios(rows).items():
        for name, value in rs.items():
            print(f"[{size}] {name}: {value:.2f}")
    # the headline lines, for the largest size measured
    last = ratios(rows).get(args.sizes[-1], {})
    for name in ("sCD/teacher", "sCT/teacher"):
        if name in last:
            print(f"{name}: {last[name]:.2f}")
    print(f"wrote {out} (median of {args.repeats} repeats)")
    return 0


# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scm", description="Continuous-time consistency models (sCM): "
                                "train, sample, evaluate, benchmark.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="facts about models and configs").add_subparsers(dest="what", required=True)
    sizes = info.add_parser("sizes", help="model sizes with parameter counts (counted on the meta device)")
    sizes.add_argument("--dataset", default="imagenet512")
    sizes.set_defaults(func=cmd_info_sizes)

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

    bench = sub.add_parser("bench", help="benchmarks (median of repeats, hardware stated)")
    bsub = bench.add_subparsers(dest="what", required=True)
    step = bsub.add_parser("step", help="training-step time of teacher, sCT and sCD")
    step.add_argument("--sizes", nargs="+", default=["tS", "tM", "tL"])
    step.add_argument("--dataset", default="shapes")
    step.add_argument("--batch", type=int, default=64)
    step.add_argument("--repeats", type=int, default=7)
    step.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    step.add_argument("--device", default="cpu")
    step.add_argument("--out", default="results/bench/step.csv")
    step.set_defaults(func=cmd_bench_step)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from scm.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"scm: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
