"""The pipeline and sweeps on the real test SLURM cluster: the slurm profile end to end (tiny)."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

TINY_STUDY = {
    "study": "tiny-slurm", "dataset": "shapes", "sizes": ["tS"], "methods": ["teacher", "scd"], "seeds": [0],
    "overrides": {"run": {"threads": 1, "batch_size": 16, "log_kimg": 0.064, "checkpoint_kimg": 1.0},
                  "data": {"num_images": 256}, "network": {"model_channels": 8}},
    "method_overrides": {"teacher": {"run": {"total_kimg": 0.16}}, "scd": {"run": {"total_kimg": 0.08}}},
    "ablations": {"names": []},
    "eval": {"cm_steps": [1], "teacher_steps": [2], "num_samples": 32, "seed_sets": 1},
    "sweep": {"enabled": False},
    "launcher": "slurm", "cluster": "test", "clusters": str(ROOT / "config" / "clusters.yaml"),
}


def test_slurm_profile_end_to_end(slurm_cluster, tmp_path):
    study = tmp_path / "tiny.yaml"
    results = tmp_path / "results"
    study.write_text(yaml.safe_dump({**TINY_STUDY, "results": str(results)}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([SNAKEMAKE, "--configfile", str(study), "--profile", "profiles/slurm", "--cores", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    # both trainings ran as SLURM jobs (their ids are in run.json), and the report exists
    for run in ("teacher-tS-base-s0", "scd-tS-base-s0"):
        run_json = yaml.safe_load((results / "runs" / run / "run.json").read_text())
        assert run_json["slurm_job_ids"], run
    assert "sCD" in (results / "tables" / "main.md").read_text()


def test_sweep_workers_as_a_slurm_array(slurm_cluster, tmp_path, monkeypatch):
    # the cheap objective lives in tests/unit/test_sweep.py: jobs unpickle it by module name, and
    # sbatch passes this environment (PYTHONPATH included) to them
    unit = str(ROOT / "tests" / "unit")
    monkeypatch.syspath_prepend(unit)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [unit, os.environ.get("PYTHONPATH")])))
    from test_sweep import Quadratic, cheap_spec, study_of  # noqa: PLC0415

    from scm import sweep
    from scm.launch import get_profile

    spec = cheap_spec(n_trials=4, name="slurm")
    out = tmp_path / "out"
    summary = sweep.run_sweep(spec, out, workers=2, launcher="slurm",
                              profile=get_profile(ROOT / "config" / "clusters.yaml", "test"),
                              objective=Quadratic(tmp_path))
    trials = study_of(spec, out).trials
    assert 4 <= len(trials) <= 5 and summary
    assert (out / "best.yaml").exists() and (out / "trials.csv").exists()
    pids = {line.split()[0] for line in (tmp_path / "calls.txt").read_text().splitlines()}
    assert len(pids) >= 1
