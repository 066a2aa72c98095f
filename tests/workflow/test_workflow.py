"""The Snakemake pipeline: lint, dry runs of every study and profile, a tiny real run end to end."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
STUDIES = ["config/config.yaml", "config/cifar10.yaml", "config/imagenet64.yaml", "config/imagenet512.yaml"]

pytestmark = pytest.mark.workflow


def snakemake(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_lint():
    proc = snakemake("--lint")
    assert proc.returncode == 0 and "good condition" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def with_inputs(study: str, tmp_path: Path, drop: str | None = None) -> str:
    """A copy of a study whose eval inputs (weights, decoder, reference statistics) are existing dummy files,
    as after fetching them on the login node; `drop` leaves that one missing."""
    cfg = yaml.safe_load((ROOT / study).read_text())
    for key in ("inception", "vae", "dinov2", "ref_stats"):
        if cfg["eval"].get(key):
            path = tmp_path / "inputs" / f"{key}{Path(cfg['eval'][key]).suffix}"
            path.parent.mkdir(exist_ok=True)
            if key != drop:
                path.mkdir() if key == "vae" else path.write_bytes(b"dummy")
            cfg["eval"][key] = str(path)
    out = tmp_path / Path(study).name
    out.write_text(yaml.safe_dump(cfg))
    return str(out)


@pytest.mark.parametrize("profile", ["local", "slurm"])
@pytest.mark.parametrize("study", STUDIES)
def test_dry_run(study, profile, tmp_path):
    proc = snakemake("-n", "--configfile", with_inputs(study, tmp_path), "--profile", f"profiles/{profile}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    cfg = yaml.safe_load((ROOT / study).read_text())
    for method in cfg["methods"]:
        for size in cfg["sizes"]:
            assert f"{method}-{size}-base-s0" in out


def test_imagenet512_grid_is_the_papers(tmp_path):
    proc = snakemake("-n", "--configfile", with_inputs("config/imagenet512.yaml", tmp_path), "--profile",
                     "profiles/slurm")
    out = proc.stdout + proc.stderr
    for size in ("S", "M", "L", "XL", "XXL"):
        for method in ("teacher", "scd", "sct"):
            assert f"runs/{method}-{size}-base-s0/final.pt" in out
    assert "sct-S-tangent_warmup_off-s1" in out and "metrics/scd-XXL-base-s0.json" in out


def test_imagenet512_evaluations_are_gpu_job_arrays_with_every_input(tmp_path):
    study = with_inputs("config/imagenet512.yaml", tmp_path)
    proc = snakemake("-n", "-p", "--configfile", study, "--profile", "profiles/slurm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [j for j in (proc.stdout + proc.stderr).split("\n\n") if "rule evaluate:" in j]
    assert len(jobs) == job_stats(proc.stdout + proc.stderr)["evaluate"] > 30
    inputs = yaml.safe_load(Path(study).read_text())["eval"]
    for job in jobs:
        command = job.split("Shell command:", 1)[1]
        assert "gpu=1" in job.split("resources:", 1)[1].splitlines()[0]  # gpu1-eval: one GPU per task
        assert "--launcher slurm --shards 16 --cluster gpu1-eval --clusters config/clusters.yaml" in command
        for flag, key in (("--extractor-weights", "inception"), ("--vae", "vae"), ("--dinov2", "dinov2"),
                          ("--ref-stats", "ref_stats")):
            assert f"{flag} {inputs[key]}" in command, (flag, command)
        teacher = "runs/teacher-" in command
        assert ("--solver dpm2s --guidance 1.4" in command) == teacher and "--num 50000 --seed-sets 3" in command
    grids = [j for j in (proc.stdout + proc.stderr).split("\n\n") if "rule samples:" in j]
    assert grids and all("--launcher slurm --cluster gpu1-eval" in j and "--vae" in j for j in grids)


@pytest.mark.parametrize(("study", "drop", "key"), [("config/imagenet512.yaml", "vae", "eval.vae"),
                                                    ("config/imagenet512.yaml", "ref_stats", "eval.ref_stats"),
                                                    ("config/cifar10.yaml", "inception", "eval.inception")])
def test_missing_eval_input_fails_at_dag_build(study, drop, key, tmp_path):
    proc = snakemake("-n", "--configfile", with_inputs(study, tmp_path, drop=drop), "--profile", "profiles/slurm")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line and not line.startswith("Using profile")]
    assert len(lines) == 1 and f"{key}: {tmp_path / 'inputs'}" in lines[0] and "not found" in lines[0], proc.stderr


TINY_STUDY = {
    "study": "tiny", "dataset": "shapes", "sizes": ["tS"], "methods": ["teacher", "scd", "sct"], "seeds": [0],
    "overrides": {"run": {"threads": 1, "batch_size": 16, "log_kimg": 0.064, "checkpoint_kimg": 1.0},
                  "data": {"num_images": 256}, "network": {"model_channels": 8}},
    "method_overrides": {"teacher": {"run": {"total_kimg": 0.32}}, "scd": {"run": {"total_kimg": 0.16}},
                         "sct": {"run": {"total_kimg": 0.16}}},
    "ablations": {"method": "scd", "size": "tS", "seeds": [0, 1], "names": ["tangent_norm_clip", "adagn_plain"]},
    "eval": {"cm_steps": [1, 2], "teacher_steps": [4], "num_samples": 64, "seed_sets": 2},
    "sweep": {"enabled": False},
    "launcher": "debug",
}


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    study = tmp_path / "tiny.yaml"
    results = tmp_path / "results"
    study.write_text(yaml.safe_dump({**TINY_STUDY, "results": str(results)}))
    proc = snakemake("--configfile", str(study), "--profile", "profiles/local", timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    main = (results / "tables" / "main.md").read_text()
    for method in ("TrigFlow teacher", "sCT", "sCD"):
        assert method in main
    ablations = (results / "tables" / "ablations.md").read_text()
    for row in ("full recipe", "tangent_norm_clip", "adagn_plain"):
        assert row in ablations
    assert "sCD, tS, 0.16 kimg (10 iterations at batch 16), 2 seeds (0, 1)" in ablations
    assert "| adagn_plain " in ablations and "own (FID" in ablations  # its own teacher, network changed
    for fig in ("compute_vs_fid", "figure1_paper", "fid_vs_size", "ablation_curves", "ablation_effects", "samples"):
        assert (results / "figures" / f"{fig}.png").stat().st_size > 1000
    assert (results / "tables" / "main.tex").exists() and (results / "tables" / "cost.md").exists()
    # snakemake's HTML report bundles the tables and figures
    html = snakemake("--configfile", str(study), "--report", str(tmp_path / "report.html"))
    assert html.returncode == 0 and (tmp_path / "report.html").stat().st_size > 10_000, html.stderr[-2000:]
    # a second run does nothing
    again = snakemake("--configfile", str(study), "--profile", "profiles/local", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    # deleting one metrics file reruns only its evaluation and the report
    (results / "metrics" / "scd-tS-full-s1.json").unlink()
    dry = snakemake("--configfile", str(study), "--profile", "profiles/local", "-n", "--quiet", "rules")
    assert job_stats(dry.stdout + dry.stderr) == {"evaluate": 1, "report": 1, "all": 1}


def job_stats(output: str) -> dict[str, int]:
    """The 'Job stats' table of a snakemake dry run: {rule: count}."""
    lines = output.split("Job stats:", 1)[1].splitlines()[3:]
    rows = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        rows[parts[0]] = int(parts[1])
    return rows
