"""Where a pipeline's wall time goes: work the runs report vs everything around it.

From a finished study (its results folder) and the pipeline's wall time:

- job time: every rule's `benchmark:` file (Snakemake measures each job's wall seconds; with
  --benchmark-extended, as the profiles set it, a job of N threads holds N cores);
- work: what the jobs themselves report doing: training steps (stats.jsonl: sec_per_kimg x kimg of each
  logged window; a sweep's trials likewise, plus the seconds its objective spent sampling and scoring,
  trials.csv), sampling and metrics (metrics.json: sample_seconds, metric_seconds), the shapes feature
  network's training steps (its record, artifacts/shapes-features-data<V>.json); rules that report nothing
  (configs, sample grids, the report) count as overhead;
- per-job overhead = job time - work (process start-up, imports, setup such as building networks, loading
  extractors and reference statistics, checkpoint and report writing);
- idle = cores x wall - job time (slots the scheduler left empty: dependencies, Snakemake's own
  bookkeeping between jobs).

overhead = wall - work / cores, the share of the wall clock not spent on work (target <= 10%).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RuleTime:
    rule: str
    jobs: int
    job_s: float       # sum of the jobs' core-seconds (wall seconds x threads, benchmark files)
    work_s: float      # sum of the work the jobs report (0 where a rule reports none)

    @property
    def overhead_s(self) -> float:
        return self.job_s - self.work_s


def _benchmark_seconds(path: Path) -> float:
    """Core-seconds one job held: its wall seconds (the first row's `s`; Snakemake writes one row per repeat)
    times its threads (the `threads` column of --benchmark-extended files, else 1)."""
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        return 0.0
    return float(rows[0]["s"]) * int(float(rows[0].get("threads") or 1))


def training_seconds(run_dir: Path) -> float:
    """Seconds of training steps a run logged: each stats row covers the kimg since the previous row."""
    path = run_dir / "stats.jsonl"
    if not path.exists():
        return 0.0
    total, prev = 0.0, 0.0
    for line in path.read_text().splitlines():
        row = json.loads(line)
        total += float(row.get("sec_per_kimg", 0.0)) * (float(row["kimg"]) - prev)
        prev = float(row["kimg"])
    return total


def evaluation_seconds(metrics_path: Path) -> float:
    """Seconds of sampling and of features + metrics that an evaluation recorded (all its entries)."""
    entries = json.loads(metrics_path.read_text())
    return sum(float(e.get("sample_seconds") or 0) + float(e.get("metric_seconds") or 0) for e in entries)


def trial_evaluation_seconds(trials_csv: Path) -> float:
    """Seconds a sweep's trials spent sampling and scoring (the objective's FIDs): trials.csv's eval_seconds."""
    if not trials_csv.exists():
        return 0.0
    with open(trials_csv) as f:
        return sum(float(row.get("user_attrs_eval_seconds") or 0) for row in csv.DictReader(f))


def _work_of(rule: str, name: str, results: Path) -> float:
    """The work one job reports, from its benchmark file's name (the job's wildcard)."""
    if rule in ("train", "train_teacher"):
        return training_seconds(results / "runs" / name)
    if rule == "evaluate" and (results / "metrics" / f"{name}.json").exists():
        return evaluation_seconds(results / "metrics" / f"{name}.json")
    if rule == "sweeps":  # each trial is a training run of its own, scored by sampling
        sweep = results / "sweeps" / name
        return (sum(training_seconds(d) for d in (sweep / "trials").glob("*") if d.is_dir())
                + trial_evaluation_seconds(sweep / "trials.csv"))
    if rule == "extractor":  # the shapes feature network's training steps (its record; `data2` -> version 2)
        record = results / "artifacts" / f"shapes-features-{name}.json"
        return float(json.loads(record.read_text()).get("train_seconds", 0.0)) if record.exists() else 0.0
    return 0.0


def rule_times(results: str | Path) -> list[RuleTime]:
    """Per rule: jobs, job seconds and reported work, from RESULTS/benchmarks/<rule>/<job>.tsv."""
    results = Path(results)
    out = []
    for rule_dir in sorted(p for p in (results / "benchmarks").glob("*") if p.is_dir()):
        files = sorted(rule_dir.glob("*.tsv"))
        rule = rule_dir.name
        job_s = sum(_benchmark_seconds(f) for f in files)
        work_s = sum(_work_of(rule, f.stem, results) for f in files)
        out.append(RuleTime(rule, len(files), job_s, work_s))
    return out


def breakdown(results: str | Path, wall_s: float, cores: int) -> dict:
    """The wall clock split into work, per-job overhead and idle slots (all in core-seconds and as shares)."""
    rules = rule_times(results)
    job_s = sum(r.job_s for r in rules)
    work_s = sum(r.work_s for r in rules)
    slots = cores * wall_s
    return {
        "wall_s": wall_s, "cores": cores, "jobs": sum(r.jobs for r in rules),
        "work_core_s": work_s, "job_overhead_core_s": job_s - work_s, "idle_core_s": max(0.0, slots - job_s),
        "overhead_share": 1.0 - work_s / slots if slots else float("nan"),
        "rules": [{"rule": r.rule, "jobs": r.jobs, "job_s": r.job_s, "work_s": r.work_s,
                   "overhead_s": r.overhead_s, "overhead_per_job_s": r.overhead_s / r.jobs if r.jobs else 0.0}
                  for r in rules],
    }
