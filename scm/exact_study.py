"""The exact-answer study's grid and jobs: rows x techniques x seeds, decided up front from the study config.

The jobs are dealt into a few training processes that each train and score several techniques x every
seed (tiny runs: each process pays torch's import and the optimizer's first use, several CPU-seconds),
with the project's own training loop; scm.exact holds the exact answers they are scored against.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from scm import exact
from scm.config import Config, ConfigError, flatten, from_dict, resolve, to_dict

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# The study grid: rows (what is distilled or trained from what) x techniques x seeds.
#   scd_exact    sCD from the exact velocity (the ablation row: full recipe + one run per ablation file)
#   scd_learned  sCD from a TrigFlow teacher trained by the pipeline (initialized from its EMA weights)
#   sct          sCT from the data


ROWS = {"scd_exact": "scd", "scd_learned": "scd", "sct": "sct"}


class ExactStudy:
    """The jobs of an exact study (the study config Snakemake loads), decided up front.

    A job is one (row, technique) with every seed; the jobs are dealt into `exact.processes` groups, one
    pipeline job (one process) each.
    """

    def __init__(self, config: dict[str, Any], root: str | Path = "."):
        from scm.study import load_ablation

        self.cfg = config
        self.results = Path(config.get("results", "results"))
        self.exact = config.get("exact", {}) or {}
        ab = config.get("ablations", {}) or {}
        self.size = ab.get("size", config["sizes"][0])
        folder = Path(root) / ab.get("dir", "ablations")
        files = sorted(p.stem for p in folder.glob("*.yaml"))
        names = files if ab.get("names") is None else list(ab["names"])
        self.skip = {k: v for k, v in (self.exact.get("skip", {}) or {}).items() if k in names or k not in files}
        unknown = sorted(set(self.skip) - set(files))
        if unknown:
            raise ConfigError(f"exact.skip: {unknown} are not ablation files in {folder}")
        self.ablations = {n: load_ablation(folder / f"{n}.yaml") for n in names if n not in self.skip}
        self.rows = list(self.exact.get("rows", list(ROWS)))
        bad = [r for r in self.rows if r not in ROWS]
        if bad:
            raise ConfigError(f"exact.rows: unknown {bad}; choose from {list(ROWS)}")
        self.seeds = [int(s) for s in config.get("seeds", [0])]
        self.ablation_seeds = [int(s) for s in ab.get("seeds", self.seeds)]
        self.processes = int(self.exact.get("processes", 4))
        if self.processes < 1:
            raise ConfigError(f"exact.processes: expected at least 1, got {self.processes}")

    def jobs(self) -> list[tuple[str, str]]:
        """(row, technique): every row with the full recipe, then the ablation row's techniques."""
        return [(row, "full") for row in self.rows] + [("scd_exact", name) for name in self.ablations]

    def job_name(self, row: str, technique: str) -> str:
        return f"{row}-{technique}"

    def groups(self) -> dict[str, list[tuple[str, str]]]:
        """The training jobs of the pipeline: 'part1'..'partN' (N = exact.processes, at most one per job),
        contiguous runs of jobs() of near-equal length. scd_learned comes last, so that only the last group
        waits for the learned teacher while the others run."""
        order = [j for j in self.jobs() if j[0] != "scd_learned"] + [j for j in self.jobs() if j[0] == "scd_learned"]
        n = min(self.processes, len(order))
        out, start = {}, 0
        for i in range(n):
            size = len(order) // n + (1 if i < len(order) % n else 0)
            out[f"part{i + 1}"] = order[start:start + size]
            start += size
        return out

    def needs_teacher(self, group: str) -> bool:
        """Whether a group trains from the learned teacher (its pipeline job waits for the teacher run)."""
        return any(row == "scd_learned" for row, _ in self.groups().get(group, []))

    def seeds_of(self, row: str) -> list[int]:
        return self.ablation_seeds if row == "scd_exact" else self.seeds

    def teacher_run(self) -> str:
        """Run id of the learned teacher (trained by the pipeline's own train rule, scm.study's naming)."""
        from scm.study import Run

        return Run("teacher", self.size, "base", int(self.cfg.get("teacher_seed", 0))).run_id

    def run_dir(self, run_id: str) -> Path:
        return self.results / "runs" / run_id

    def overrides(self, row: str, technique: str, seed: int) -> dict[str, Any]:
        """Study-wide, then the method's, the ablation grid's, the row's, then the ablation file's overrides."""
        method = ROWS[row]
        out: dict[str, Any] = {}
        out.update(flatten(self.cfg.get("overrides", {}) or {}))
        out.update(flatten((self.cfg.get("method_overrides", {}) or {}).get(method, {}) or {}))
        if row == "scd_exact":
            out.update(flatten((self.cfg.get("ablations", {}) or {}).get("overrides", {}) or {}))
        out.update(flatten((self.exact.get("row_overrides", {}) or {}).get(row, {}) or {}))
        if technique != "full":
            out.update(self.ablations[technique])
        out["run.seed"] = seed
        if row == "scd_exact":
            out["run.teacher_run_dir"] = exact.EXACT_PREFIX + "data"
        elif row == "scd_learned":
            out["run.teacher_run_dir"] = str(self.run_dir(self.teacher_run()))
        return out

    def run_config(self, row: str, technique: str, seed: int) -> Config:
        cfg = resolve(self.cfg["dataset"], self.size, ROWS[row], self.overrides(row, technique, seed))
        # error-vs-iterations curves: the EMA network is scored `curve_points` times during training
        cfg.run.eval_kimg = cfg.run.total_kimg / int(self.exact.get("curve_points", 10))
        return cfg

    def job(self, row: str, technique: str) -> dict[str, Any]:
        """What `scm exact train` needs: every seed's run id, run directory and resolved config."""
        runs = []
        for seed in self.seeds_of(row):
            run_id = f"{self.job_name(row, technique)}-s{seed}"
            runs.append({"run_id": run_id, "seed": seed, "run_dir": str(self.run_dir(run_id)),
                         "config": to_dict(self.run_config(row, technique, seed))})
        return {"row": row, "technique": technique, "runs": runs,
                "curve_noises": int(self.exact.get("curve_noises", 256)),
                "sw_projections": int(self.exact.get("sw_projections", 256))}

    def reference_spec(self) -> dict[str, Any]:
        cfg = self.run_config("scd_exact", "full", 0)
        T = exact.t_max(cfg.sigma_d, cfg.sampler.sigma_max)
        return {"data": to_dict(cfg)["data"], "sigma_d": cfg.sigma_d,
                "times": [T] + [float(t) for t in self.exact.get("eval_times", [1.1, 0.6, 0.2])],
                "num": int(self.exact.get("eval_noises", 1024)), "seed": int(self.exact.get("eval_seed", 0)),
                "ode_steps": int(self.exact.get("ode_steps", 400)),
                "sw_projections": int(self.exact.get("sw_projections", 256))}

    def map2d_spec(self) -> dict[str, Any]:
        """The 2-D variant: the full recipe (sCD, exact teacher) on a 2-D mixture, data shape (2, 1, 1)."""
        m2 = self.exact.get("map2d", {}) or {}
        ov = self.overrides("scd_exact", "full", 0)
        ov.update({"data.resolution": 1, "data.channels": 2, "data.gmm_components": int(m2.get("components", 5)),
                   "data.gmm_seed": int(m2.get("seed", 0)), "network.channel_mult": [1],
                   "network.attn_resolutions": [1], "run.total_kimg": float(m2.get("total_kimg", 9.6))})
        cfg = resolve(self.cfg["dataset"], self.size, "scd", ov)
        return {"config": to_dict(cfg), "run_dir": str(self.run_dir("map2d-scd_exact-full-s0")),
                "points": int(m2.get("points", 300)), "ode_steps": int(self.exact.get("ode_steps", 400)), "seed": 0}

    def report_spec(self) -> dict[str, Any]:
        return {"study": self.cfg.get("study", "gmm"), "skip": self.skip,
                "jobs": [self.job_name(r, t) for r, t in self.jobs()]}

    def group_spec(self, group: str) -> dict[str, Any]:
        """What `scm exact train` needs for one group: its jobs, in order."""
        return {"group": group, "jobs": [self.job(row, technique) for row, technique in self.groups()[group]]}

    def spec(self, name: str) -> dict[str, Any]:
        """The spec of a pipeline step, passed inline by its rule: 'reference', 'map2d', 'report',
        'group-<group>' (a training job of groups()) or 'job-<row>-<technique>' (one job)."""
        if name == "reference":
            return self.reference_spec()
        if name == "map2d":
            return self.map2d_spec()
        if name == "report":
            return self.report_spec()
        if name.startswith("group-") and name[len("group-"):] in self.groups():
            return self.group_spec(name[len("group-"):])
        for row, technique in self.jobs():
            if name == "job-" + self.job_name(row, technique):
                return self.job(row, technique)
        raise ConfigError(f"exact study: no step {name!r}; groups: {list(self.groups())}, "
                          f"jobs: {[self.job_name(*j) for j in self.jobs()]}")


# ----------------------------------------------------------------------------
# One job: train every seed of one (row, technique) with the project's loop, then score it.


def run_job(job: dict[str, Any], ref: dict) -> dict[str, Any]:
    """Train (or resume; a finished run returns at once) and score every run of a job.

    The EMA network is scored on the first `curve_noises` reference noises every run.eval_kimg (the
    error-vs-iterations curve, kept in the run directory as exact_curve.json), the final EMA network
    on every metric.
    """
    from scm.fileio import atomic_write_json
    from scm.train import load_final, train

    out = []
    for run in job["runs"]:
        cfg = from_dict(run["config"])
        run_dir = Path(run["run_dir"])
        mixture = exact.mixture_of(cfg)
        curve: list[dict] = []

        def on_eval(step, kimg, ema_model, cfg=cfg, curve=curve):
            # the curves show the error at T only: one forward pass per point
            err = exact.one_step_errors(ema_model, ref, cfg.sigma_d, num=job["curve_noises"], times=1)
            curve.append({"step": step, "kimg": kimg, "err": err})

        status = train(cfg, run_dir, on_config_change="restart", on_eval=on_eval)
        curve_path = run_dir / "exact_curve.json"
        if curve:
            atomic_write_json(curve_path, curve)
        elif curve_path.exists():  # finished earlier: its curve was kept
            curve = json.loads(curve_path.read_text())
        net, _ = load_final(run_dir, "ema")
        metrics = exact.evaluate(net, mixture, ref, cfg.sigma_d, job["sw_projections"])
        log.info("%s: one-step error %.4f, SW 2-step %.4f", run["run_id"], metrics["err_T"], metrics["sw_2step"])
        out.append({"run_id": run["run_id"], "seed": run["seed"], "state": status.get("state"),
                    "metrics": metrics, "curve": curve})
    return {"row": job["row"], "technique": job["technique"], "times": ref["times"], "runs": out}


def run_group(spec: dict[str, Any], ref: dict) -> dict[str, Any]:
    """Every job of one training group (ExactStudy.group_spec), in one process."""
    return {"group": spec["group"], "jobs": [run_job(job, ref) for job in spec["jobs"]]}
