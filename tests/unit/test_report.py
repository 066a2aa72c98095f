"""The report's ablation table and figures, built from synthetic metrics, stats and run folders."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from scm import report
from scm.study import Study

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (0, 1, 2)
# 2-step FID per (ablation, seed). The full recipe's seeds disagree by +-8 (as in short runs).
FID = {
    "full": (30.0, 22.0, 38.0),
    "tangent_warmup_off": (40.1, 32.3, 47.9),  # +10 on every seed: outside the noise, worse
    "tangent_norm_clip": (33.0, 19.0, 39.0),  # +0.3 on average, -3..+3 per seed: within the noise
    "adagn_plain": (31.0, 21.0, 37.5),
    "jvp_rearrangement_off": (30.01, 22.0, 38.0),
    "discrete_time": (29.0, 23.0, 37.0),
    "my_variant": (22.2, 14.1, 29.8),  # -8 on every seed: better (adaptive weighting off, by its config)
    "c_noise_log_sigma": (50.0, None, 58.5),  # seed 1 diverged: no metrics
}
ACC = {"full": (0.8, 0.7, 0.9), "tangent_warmup_off": (0.5, 0.41, 0.6)}
STUDY = {
    "dataset": "shapes", "sizes": ["tS"], "methods": ["teacher", "scd"], "seeds": [0],
    "overrides": {"run": {"batch_size": 32}},
    "method_overrides": {"teacher": {"run": {"total_kimg": 12.8}}, "scd": {"run": {"total_kimg": 4.8}}},
    "ablations": {"method": "scd", "size": "tS", "seeds": list(SEEDS), "names": [a for a in FID if a != "full"],
                  "overrides": {"run": {"total_kimg": 2.4}}},
    "eval": {"cm_steps": [1, 2], "teacher_steps": [8]},
}
KIMG = [0.3 * k for k in range(1, 9)]
LOSS = [1.0, 0.9, 0.8, 0.7, 0.5, 0.7, 0.5, 0.7]
GRAD_NORM = [0.8, 0.9, 1.0, 1.0, 1.0, 1.1, 1.2, 1.3]  # median 1.0


def entry(run_id, steps, fid, acc=None):
    e = {"run_id": run_id, "steps": steps, "nfe": steps, "params": 1.2e6, "fid": [fid, fid + 1],
         "fid_min": fid, "fid_mean": fid + 0.5, "fid_sd": 0.7}
    if acc is not None:
        e["class_accuracy"] = acc
    return e


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results folder as the pipeline leaves it: run folders (run.json, stats.jsonl, status.json),
    metrics files and sample grids."""
    tmp = tmp_path_factory.mktemp("study")
    (tmp / "ablations").mkdir()
    for name in FID:
        if name not in ("full", "my_variant"):
            shutil.copy(ROOT / "ablations" / f"{name}.yaml", tmp / "ablations")
    (tmp / "ablations" / "my_variant.yaml").write_text("loss:\n  adaptive_weighting: false\n")
    res = tmp / "results"
    study = Study({**STUDY, "results": str(res)}, root=tmp)
    metrics = []
    for run in study.runs():
        run_dir = res / "runs" / run.run_id
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"config": study.config_dict(run.run_id)}))
        grad_max = [1.3] * 8
        if run.run_id == "scd-tS-tangent_warmup_off-s1":
            grad_max[2] = 60.0  # one spike: 60 / median 1.0
        rows = [{"kimg": k, "loss": loss + 0.01 * run.seed, "grad_norm": gn, "grad_norm_max": g,
                 "sec_per_kimg": 10.0}
                for k, loss, gn, g in zip(KIMG, LOSS, GRAD_NORM, grad_max)]
        (run_dir / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if run.method == "teacher":
            fid = 5.0 if run.ablation == "base" else 6.5
            entries = [entry(run.run_id, 8, fid, 0.95)]
        elif run.ablation == "base":
            entries = [entry(run.run_id, s, 9.0 - s, 0.9) for s in (1, 2)]
        else:
            fid = FID[run.ablation][run.seed]
            if fid is None:
                (run_dir / "status.json").write_text(json.dumps({"state": "diverged", "step": 41}))
                continue
            acc = ACC.get(run.ablation, (None,) * 3)[run.seed]
            entries = [entry(run.run_id, 1, fid + 10, acc), entry(run.run_id, 2, fid, acc)]
        (run_dir / "status.json").write_text(json.dumps({"state": "completed", "step": 75}))
        path = res / "metrics" / f"{run.run_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entries))
        metrics.append(path)
        if run.ablation == "base":
            (res / "samples" / run.run_id).mkdir(parents=True)
            PIL.Image.new("RGB", (40, 40), (200, 30, 30)).save(res / "samples" / run.run_id / "grid.png")
    return res, metrics


def effects_of(results):
    res, metrics = results
    e = report.ablation_effects(report.load_metrics(metrics), res)
    return e[(e["steps"] == 2) & (e["metric"] == "FID")].set_index("ablation")


def test_a_known_effect_is_outside_the_noise_and_a_small_one_inside(results):
    e = effects_of(results)
    # fid_mean = fid_min + 0.5 in every file, so differences are the FID table's differences
    d = np.subtract(FID["tangent_warmup_off"], FID["full"])
    assert e.loc["tangent_warmup_off", "diff"] == pytest.approx(d.mean())
    assert e.loc["tangent_warmup_off", "verdict"] == "worse" and e.loc["tangent_warmup_off", "diff_lo"] > 0
    assert e.loc["my_variant", "verdict"] == "better"
    for name in ("tangent_norm_clip", "adagn_plain", "discrete_time"):
        assert e.loc[name, "verdict"] == "within noise", name
        assert e.loc[name, "diff_lo"] < 0 < e.loc[name, "diff_hi"]
    # identical differences on every seed (a coarse metric) are not called an effect
    assert report._verdict({"diff": -0.04, "lo": -0.04, "hi": -0.04, "significant": True}, +1) == "no seed spread"
    # the diverged seed drops out: paired over seeds 0 and 2 only
    assert e.loc["c_noise_log_sigma", "n"] == 2
    assert e.loc["c_noise_log_sigma", "diff"] == pytest.approx((50.0 - 30.0 + 58.5 - 38.0) / 2)
    # the full recipe's own interval: the t-interval of its three seeds (t_0.975,2 = 4.303)
    full = np.add(FID["full"], 0.5)
    half = 4.303 * full.std(ddof=1) / math.sqrt(3)
    assert (e.loc["full", "lo"], e.loc["full", "hi"]) == pytest.approx((full.mean() - half, full.mean() + half),
                                                                       rel=1e-3)


def test_rows_are_grouped_by_the_papers_techniques(results):
    res, metrics = results
    table = report.ablation_table(report.load_metrics(metrics), res)
    assert list(table["ablation"]) == ["full recipe", "tangent_warmup_off", "c_noise_log_sigma", "adagn_plain",
                                       "tangent_norm_clip", "my_variant", "jvp_rearrangement_off", "discrete_time"]
    # the group label starts each group; my_variant is grouped by what its config changes, not its name
    assert list(table["technique"]) == [report.FULL, "tangent warmup", "c_noise = t", "adaptive double normalization",
                                        "tangent normalization", "adaptive weighting", "JVP rearrangement",
                                        report.OTHER]
    row = table.set_index("ablation")
    assert row.loc["tangent_warmup_off", "ΔFID vs full (95% CI)"].endswith("worse")
    assert row.loc["tangent_norm_clip", "ΔFID vs full (95% CI)"].endswith("within noise")
    assert row.loc["tangent_warmup_off", "Δclass acc vs full (95% CI)"].endswith("worse")
    assert row.loc["tangent_norm_clip", "class acc"] == "-"  # no class accuracy in its metrics


def test_stability_columns(results):
    res, metrics = results
    row = report.ablation_table(report.load_metrics(metrics), res).set_index("ablation")
    assert row.loc["c_noise_log_sigma", "diverged"] == "1/3 (s1@41)"
    assert row.loc["full recipe", "diverged"] == "0/3"
    # spikes: max / median grad norm per run (1.3, 60, 1.3), mean over the seeds, worst seed
    assert row.loc["tangent_warmup_off", "grad spikes (max/median)"] == f"{(1.3 + 60 + 1.3) / 3:.1f} (worst 60.0)"
    # loss variance over the last half of training (kimg >= 1.2: the last five windows)
    assert row.loc["full recipe", "loss var (last half)"] == f"{np.var(LOSS[3:]):.3g}"
    # sCD: network ablations distill their own teacher
    assert row.loc["adagn_plain", "teacher"] == "own (FID 7.00)"
    assert row.loc["tangent_norm_clip", "teacher"] == "base (FID 5.50)"


def test_header_states_the_budget_and_notes_what_cannot_matter(results, tmp_path):
    res, metrics = results
    df = report.load_metrics(metrics)
    header = report.ablation_header(df, res)
    assert header.startswith("sCD, tS, 2.4 kimg (75 iterations at batch 32), 3 seeds (0, 1, 2), fp32; "
                             "short runs: the main sCD tS run trains 4.8 kimg, its teacher 12.8 kimg")
    full = np.add(FID["full"], 0.5)
    assert f"2-step FID {full.mean():.2f} ± " in header and f"sd {full.std(ddof=1):.2f}" in header
    notes = " ".join(report.ablation_notes(df, res))
    assert "JVP rearrangement cannot matter here" in notes and "fp32" in notes
    report.write_ablation_tables(df, res, tmp_path / "ablations.md", tmp_path / "ablations.tex", "shapes: ablations")
    md = (tmp_path / "ablations.md").read_text()
    assert md.index("## 2-step sampling") < md.index("## 1-step sampling") < md.index("## Notes")
    assert md.lower().count("grad spikes") == 2  # the stability columns once (2-step table), and the note


def test_figures_are_small_multiples_and_grids_carry_their_numbers(results, tmp_path):
    res, metrics = results
    df = report.load_metrics(metrics)
    techniques = report.ablation_curves(df, res, tmp_path / "curves.png")
    assert techniques == ["tangent warmup", "c_noise = t", "adaptive double normalization", "tangent normalization",
                          "adaptive weighting", "JVP rearrangement", report.OTHER]  # one panel column each
    report.ablation_effects_figure(df, res, tmp_path / "effects.png")
    titles = report.sample_montage(df, res, tmp_path / "samples.png")
    # the main table's numbers (FID: min over seed sets) at the steps the grid is drawn with
    assert "sCD tS, 2 step(s) (NFE 2)\nFID 7.00, class acc 0.90" in titles
    assert "TrigFlow teacher tS, 8 step(s) (NFE 8)\nFID 5.00, class acc 0.95" in titles
    for name in ("curves", "effects", "samples"):
        assert PIL.Image.open(tmp_path / f"{name}.png").size[0] > 300


def test_build_report_writes_everything(results):
    res, metrics = results
    paths = {p.name for p in report.build_report(metrics, res, "shapes")}
    assert {"main.md", "ablations.md", "ablations.tex", "cost.md", "ablation_curves.png", "ablation_effects.png",
            "samples.png"} <= paths
    main = (res / "tables" / "main.md").read_text()
    assert "tS class acc" in main and "0.900" in main


def test_a_run_whose_trainer_died_is_named_in_the_stability_column(tmp_path):
    # status.json still says 'running', but its pid is gone on this host: the table must not pass it off
    import platform
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    res = tmp_path / "results"
    for seed, status in ((0, {"state": "completed", "step": 75}),
                         (1, {"state": "running", "step": 30, "pid": gone.pid, "host": platform.node(),
                              "updated": 0.0})):
        run_dir = res / "runs" / f"scd-tS-adagn_plain-s{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "status.json").write_text(json.dumps(status))
    cells = report._stability_cells(res, "scd", "tS", "adagn_plain")
    assert cells["diverged"] == "0/2 (s1 dead)"
