"""The exact-answer study through the pipeline: its DAG, and a tiny real run end to end."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

pytestmark = pytest.mark.workflow


def snakemake(*args, timeout=600):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([SNAKEMAKE, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_dry_run_has_every_ablation_and_row(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "gmm.yaml").read_text())
    study = tmp_path / "gmm.yaml"  # the shipped study, with empty results wherever it was run before
    study.write_text(yaml.safe_dump({**cfg, "results": str(tmp_path / "results")}))
    proc = snakemake("-n", "--printshellcmds", "--configfile", str(study), "--profile", "profiles/local")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # every technique and row is trained by exactly one of the `exact.processes` training groups
    groups = [f"groups/part{i + 1}.json" for i in range(cfg["exact"]["processes"])]
    assert all(g in out for g in groups) and f"groups/part{len(groups) + 1}.json" not in out
    skipped = set(cfg["exact"]["skip"])
    for f in (ROOT / "ablations").glob("*.yaml"):
        assert out.count(f'"run_id": "scd_exact-{f.stem}-s0"') == (f.stem not in skipped), f.stem
    for row in ("scd_exact", "scd_learned", "sct"):
        assert out.count(f'"run_id": "{row}-full-s0"') == 1, row
    assert "runs/teacher-tS-base-s0/final.pt" in out  # the learned teacher comes from the train rule
    assert "tables/exact.md" in out and "figures/exact_map2d.png" in out
    assert "metrics/" not in out and "samples/" not in out  # no FID evaluation in an exact study
    assert len(cfg["seeds"]) >= 5 and len(cfg["ablations"]["seeds"]) >= 5


TINY = {
    "results": None, "seeds": [0, 1], "teacher_seed": 0,
    "ablations": {"seeds": [0, 1], "names": ["tangent_norm_clip", "attention_blockwise"]},
    "method_overrides": {"teacher": {"run": {"total_kimg": 0.256}}, "scd": {"run": {"total_kimg": 0.128}},
                         "sct": {"run": {"total_kimg": 0.128}}},
}


@pytest.mark.slow
def test_tiny_exact_study_end_to_end(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "gmm.yaml").read_text())
    cfg.update({**TINY, "results": str(tmp_path / "results")})
    cfg["overrides"]["run"]["batch_size"] = 32
    cfg["exact"].update(eval_noises=128, curve_points=2, ode_steps=100,
                        map2d={"components": 3, "total_kimg": 0.128, "points": 50})
    study = tmp_path / "gmm.yaml"
    study.write_text(yaml.safe_dump(cfg))
    proc = snakemake("--configfile", str(study), "--profile", "profiles/local", timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    results = tmp_path / "results"
    table = (results / "tables" / "exact.md").read_text()
    for row in ("sCD, exact teacher = full recipe", "sCD, learned teacher", "sCT", "tangent_norm_clip",
                "attention_blockwise | skipped: ", "one Euler step of the exact ODE", "SW floor"):
        assert row in table, row
    for fig in ("exact_curves.png", "exact_map2d.png"):
        assert (results / "figures" / fig).stat().st_size > 10_000
    assert len(list((results / "runs").glob("scd_exact-tangent_norm_clip-s*"))) == 2
    # a second run does nothing
    again = snakemake("-n", "--configfile", str(study), "--profile", "profiles/local")
    assert "Nothing to be done" in again.stdout + again.stderr
