"""Orchestration benchmarks: Snakemake's DAG construction time for a study, SLURM submit-to-start latency."""

from __future__ import annotations

import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scm.bench.common import _stats, _wall

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Orchestration: DAG construction and SLURM submission latency.


@dataclass
class OrchestrationTiming:
    what: str  # dag_imagenet512 (s), slurm_submit_to_start (s)
    median_s: float | None
    min_s: float | None
    max_s: float | None
    repeats: int
    note: str


def dag_benchmark(configfile: str = "config/imagenet512.yaml", profile: str = "profiles/slurm", repeats: int = 3,
                  snakemake: str | None = None, cwd: str | Path = ".", extra: list[str] = ()) -> OrchestrationTiming:
    """DAG construction: wall time of `snakemake -n --configfile F --profile P` minus that of
    `snakemake --version` (interpreter start and imports), each the median of `repeats` runs."""
    exe = snakemake or str(Path(sys.executable).with_name("snakemake"))
    tmp = tempfile.TemporaryDirectory(prefix="scm-dag-")
    study = _with_placeholder_inputs(Path(cwd) / configfile, Path(tmp.name))
    dry = [exe, "-n", "--configfile", str(study), "--profile", profile, *extra]
    ver = [exe, "--version"]
    dry_t, ver_t = [], []
    for _ in range(repeats):  # interleaved
        ver_t.append(_wall(ver, cwd))
        dry_t.append(_wall(dry, cwd))
    tmp.cleanup()
    base = statistics.median(ver_t)
    diffs = [d - base for d in dry_t]
    placeholders = " (absent eval inputs replaced by empty placeholder files)" if study.parent == Path(tmp.name) else ""
    return OrchestrationTiming(f"dag_{Path(configfile).stem}", *_stats(diffs), repeats,
                               f"snakemake -n median {statistics.median(dry_t):.2f} s minus --version median "
                               f"{base:.2f} s; min/max over the dry runs{placeholders}")


def _with_placeholder_inputs(configfile: Path, tmp: Path) -> Path:
    """The study file itself, or a copy in `tmp` whose absent eval inputs (weights, decoder, reference
    statistics: checked when the DAG is built, never read by a dry run) point at empty files."""
    import yaml

    from scm.evaluate import EVAL_INPUT_KEYS

    if not configfile.exists():
        return configfile  # snakemake names it
    study = yaml.safe_load(configfile.read_text()) or {}
    ev = study.get("eval") or {}
    absent = [k for k in EVAL_INPUT_KEYS if ev.get(k) and not Path(ev[k]).exists()]
    if not absent:
        return configfile
    for key in absent:
        (tmp / key).write_bytes(b"")
        ev[key] = str(tmp / key)
    out = tmp / configfile.name
    out.write_text(yaml.safe_dump(study, sort_keys=False))
    return out


def slurm_latency_benchmark(folder: str | Path, jobs: int = 5, profile=None,
                            timeout_s: float = 300.0) -> OrchestrationTiming:
    """Seconds from ex.submit() to the job function's first line, for `jobs` tiny submitit jobs on SLURM.

    Skipped (median None, note says why) unless a SLURM controller answers `sinfo`. The job's clock is
    this machine's, so the number is exact on a single-node cluster and includes clock skew otherwise."""
    from scm.launch import ClusterProfile, make_executor

    what = "slurm_submit_to_start"
    if shutil.which("sinfo") is None:
        return OrchestrationTiming(what, None, None, None, 0, "skipped: no SLURM here (sinfo not on PATH)")
    st = subprocess.run(["sinfo", "--noheader"], capture_output=True, text=True, check=False)
    if st.returncode != 0:
        return OrchestrationTiming(what, None, None, None, 0, "skipped: no SLURM controller answers sinfo")
    profile = profile or ClusterProfile(partition="debug", cpus_per_task=1, mem_gb=0.5, time_min=5)
    ex = make_executor("slurm", folder, profile, job_name="scm-bench-latency")
    submitted = []
    for _ in range(jobs):
        t0 = time.time()
        submitted.append((t0, ex.submit(time.time)))  # the job returns its start time
    deadline = time.time() + timeout_s
    delays = []
    for t0, job in submitted:
        while not job.done():
            if time.time() > deadline:
                raise TimeoutError(f"SLURM job {job.job_id} not done after {timeout_s} s")
            time.sleep(0.2)
        delays.append(job.result() - t0)
    return OrchestrationTiming(what, *_stats(delays), jobs,
                               f"{jobs} submitit jobs, partition {profile.partition or '(default)'}; "
                               "start = time.time() in the job function")
