"""The exact-answer study: sCM runs on a Gaussian mixture scored against the true consistency function.

For a mixture the PF-ODE velocity is known in closed form (scm.gmm), so the exact consistency function
Phi(x_T) = f*(x_T, T) is an accurate ODE solve away (Lu & Song 2024, Sec. 3-4; Eq. 7's f*). This module
holds what the study needs beyond the training loop:

- the exact teacher: F_teacher = E[v_t | x_t] / sigma_d, a network without weights (sCD from a perfect
  teacher; `run.teacher_run_dir = "exact:data"`);
- the reference of fixed evaluation noises: exact ODE states at T and a few intermediate t, Phi, true
  samples for the distribution metrics and their floors;
- the exact metrics: one-step error ||f_theta(x_t, t) - Phi||, 2-step sliced Wasserstein distance, mode
  coverage (recovered mixture weights);
- the study grid (rows x techniques x seeds, decided up front from the study config) and one job that
  trains and scores every seed of one technique in one process (tiny runs: the process start dominates).

Tables and figures are in scm.exact_report.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from scm import config as C
from scm.gmm import GaussianMixture
from scm.samplers import consistency_sample
from scm.trigflow import consistency_fn, sigma_to_t

log = logging.getLogger(__name__)

EXACT_PREFIX = "exact:"


# ----------------------------------------------------------------------------
# The exact teacher (sCD from a perfect teacher).


def mixture_of(cfg: C.Config) -> GaussianMixture:
    """The mixture a 'gmm' run trains on (the same parameters as scm.data.GMMDataset)."""
    if cfg.data.name != "gmm":
        raise C.ConfigError(f"data.name: the exact teacher needs data.name='gmm', got {cfg.data.name!r}")
    dim = cfg.data.channels * cfg.data.resolution**2
    return GaussianMixture.for_data(cfg.data.gmm_components, dim, cfg.data.gmm_seed, cfg.sigma_d)


class ExactVelocityNet(torch.nn.Module):
    """F(x_t / sigma_d, t) = E[v_t | x_t] / sigma_d: the network convention of scm.networks.SCMUNet.

    With it, sigma_d F(x_t / sigma_d, t) is the exact PF-ODE dx_t/dt (TrigFlow, Sec. 3). Computed in
    float64, returned in the input's dtype. No parameters: w_phi is 0.
    """

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x, t, labels=None, guidance=None):
        sd = self.mixture.sigma_d
        t = t.reshape(-1).expand(x.shape[0]).double()
        F = self.mixture.velocity(x.flatten(1).double() * sd, t) / sd
        return F.to(x.dtype).reshape(x.shape)

    def w_phi(self, t):
        return torch.zeros_like(t).reshape(-1)


class ExactConsistencyNet(torch.nn.Module):
    """F from the exact consistency function: f* = cos t x_t - sin t sigma_d F, i.e. the perfect student."""

    def __init__(self, mixture: GaussianMixture, ode_steps: int = 400):
        super().__init__()
        self.mixture, self.ode_steps = mixture, ode_steps

    def forward(self, x, t, labels=None, guidance=None):
        sd = self.mixture.sigma_d
        t = t.reshape(-1).expand(x.shape[0]).double()
        x_t = x.flatten(1).double() * sd
        f = self.mixture.consistency(x_t, t, self.ode_steps)
        c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
        return ((c * x_t - f) / (s * sd)).to(x.dtype).reshape(x.shape)

    def w_phi(self, t):
        return torch.zeros_like(t).reshape(-1)


def exact_teacher(spec: str, cfg: C.Config, device) -> torch.nn.Module:
    """The sCD teacher named by run.teacher_run_dir = 'exact:<spec>'; spec 'data' = the run's own mixture."""
    if spec != "data":
        raise C.ConfigError(f"run.teacher_run_dir: unknown exact teacher {EXACT_PREFIX + spec!r}; "
                            f"use '{EXACT_PREFIX}data' (the exact velocity of the run's mixture)")
    mixture = mixture_of(cfg)
    return ExactVelocityNet(mixture.to(device)).eval()


# ----------------------------------------------------------------------------
# The reference: fixed evaluation noises and what the exact ODE makes of them.


def t_max(sigma_d: float, sigma_max: float = 80.0) -> float:
    """Where 1-step sampling starts: t_max = arctan(sigma_max / sigma_d) (Sec. 5.2)."""
    return sigma_to_t(sigma_max, sigma_d)


def build_reference(mixture: GaussianMixture, num: int, times: list[float], seed: int = 0,
                    ode_steps: int = 400) -> dict[str, Any]:
    """Fixed noises z, the exact PF-ODE states x_t at `times` (times[0] = T, x_T = sigma_d z), Phi = the
    state at t = 0, second-step noises z' (2-step sampling), two independent sets of true samples."""
    g = torch.Generator().manual_seed(seed)
    D = mixture.dim
    noise = torch.randn(num, D, generator=g, dtype=torch.float64)
    noise2 = torch.randn(num, D, generator=g, dtype=torch.float64)
    data_a, data_b = mixture.sample(num, generator=g), mixture.sample(num, generator=g)
    states = mixture.trajectory(mixture.sigma_d * noise, list(times) + [0.0], ode_steps)
    return {"times": list(times), "noise": noise, "noise2": noise2, "states": torch.stack(states[:-1]),
            "target": states[-1], "data_a": data_a, "data_b": data_b, "seed": seed, "ode_steps": ode_steps}


def euler_one_step(mixture: GaussianMixture, x_T: torch.Tensor, T: float) -> torch.Tensor:
    """One Euler step of the exact PF-ODE from T to 0: x_T - T dx_t/dt (the baseline a CM must beat)."""
    t = torch.full((x_T.shape[0],), T, dtype=torch.float64)
    return x_T - T * mixture.velocity(x_T, t)


# ----------------------------------------------------------------------------
# The exact metrics.


def mean_error(x: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over samples of the L2 distance ||x - target|| (over all D dimensions)."""
    return float((x.double().flatten(1) - target.double().flatten(1)).norm(dim=1).mean())


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random unit directions of W2^2 in 1-D
    (sorted projections; equal sample sizes). Fixed directions per seed."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein: needs equal sample sizes, got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=0, keepdim=True)
    pa, pb = (a @ u).sort(dim=0).values, (b @ u).sort(dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mode_weights(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Fraction of samples assigned to each component (posterior argmax at t = 0)."""
    k = mixture.component_of(x)
    return torch.bincount(k, minlength=len(mixture.weights)).double() / len(k)


def coverage_tv(mixture: GaussianMixture, x: torch.Tensor) -> float:
    """Total variation between recovered and true mixture weights: 0.5 sum_k |w_hat_k - w_k|."""
    return float(0.5 * (mode_weights(mixture, x) - mixture.weights).abs().sum())


def floors(mixture: GaussianMixture, ref: dict, projections: int = 256) -> dict[str, float]:
    """What the metrics give without any model error: true vs true samples, and the 1-step baselines."""
    T = ref["times"][0]
    x_T = ref["states"][0]
    return {"sw_floor": sliced_wasserstein(ref["data_b"], ref["data_a"], projections),
            "tv_floor": coverage_tv(mixture, ref["data_b"]),
            "err_euler": mean_error(euler_one_step(mixture, x_T, T), ref["target"]),
            "err_identity": mean_error(x_T, ref["target"])}


@torch.no_grad()
def one_step_errors(net, ref: dict, sigma_d: float, num: int | None = None) -> list[float]:
    """Mean ||f_theta(x_t, t) - Phi|| at every reference time, x_t on the exact ODE path of the same noise."""
    shape = _shape_of(net, ref)
    dtype = _dtype_of(net)
    out = []
    for i, t in enumerate(ref["times"]):
        x_t = ref["states"][i][:num].to(dtype).reshape(-1, *shape)
        tt = torch.full((x_t.shape[0],), float(t), dtype=dtype)
        f = consistency_fn(x_t, tt, net(x_t / sigma_d, tt, None, None), sigma_d)
        out.append(mean_error(f, ref["target"][:num]))
    return out


@torch.no_grad()
def evaluate(net, mixture: GaussianMixture, ref: dict, sigma_d: float, projections: int = 256,
             t_mid: float = 1.1) -> dict[str, Any]:
    """Every exact metric of one network, from the reference's fixed noises (deterministic)."""
    shape, dtype = _shape_of(net, ref), _dtype_of(net)
    errs = one_step_errors(net, ref, sigma_d)
    T = ref["times"][0]
    z = ref["noise"].to(dtype).reshape(-1, *shape)
    # 1 step: f(sigma_d z, T); 2 steps through t_mid = 1.1 with the fixed second noise z' (Sec. 5.2).
    one, _ = consistency_sample(net, z, sigma_d, times=[T])
    x0 = one.double().flatten(1)
    x_mid = math.cos(t_mid) * x0 + math.sin(t_mid) * sigma_d * ref["noise2"]
    tt = torch.full((x0.shape[0],), t_mid, dtype=dtype)
    x_mid = x_mid.to(dtype).reshape(-1, *shape)
    two = consistency_fn(x_mid, tt, net(x_mid / sigma_d, tt, None, None), sigma_d).double().flatten(1)
    return {"times": list(ref["times"]), "err": errs, "err_T": errs[0],
            "sw_1step": sliced_wasserstein(x0, ref["data_a"], projections),
            "sw_2step": sliced_wasserstein(two, ref["data_a"], projections),
            "tv_1step": coverage_tv(mixture, x0), "tv_2step": coverage_tv(mixture, two),
            "weights_2step": mode_weights(mixture, two).tolist()}


def _shape_of(net, ref) -> tuple[int, ...]:
    res, ch = getattr(net, "img_resolution", None), getattr(net, "img_channels", None)
    return (ch, res, res) if res else (ref["noise"].shape[1],)


def _dtype_of(net) -> torch.dtype:
    p = next(iter(net.parameters()), None)
    return p.dtype if p is not None else torch.float64


def save_reference(ref: dict, path: str | Path) -> None:
    from scm.checkpoint import save_checkpoint

    save_checkpoint(Path(path), ref)


def load_reference(path: str | Path) -> dict:
    from scm.checkpoint import load_checkpoint

    return load_checkpoint(Path(path))


# ----------------------------------------------------------------------------
# The study grid: rows (what is distilled or trained from what) x techniques x seeds.
#   scd_exact    sCD from the exact velocity (the ablation row: full recipe + one run per ablation file)
#   scd_learned  sCD from a TrigFlow teacher trained by the pipeline (initialized from its EMA weights)
#   sct          sCT from the data


ROWS = {"scd_exact": "scd", "scd_learned": "scd", "sct": "sct"}


class ExactStudy:
    """The jobs of an exact study (the study config Snakemake loads), decided up front.

    A job is one (row, technique): every seed trains and is scored in one process.
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
            raise C.ConfigError(f"exact.skip: {unknown} are not ablation files in {folder}")
        self.ablations = {n: load_ablation(folder / f"{n}.yaml") for n in names if n not in self.skip}
        self.rows = list(self.exact.get("rows", list(ROWS)))
        bad = [r for r in self.rows if r not in ROWS]
        if bad:
            raise C.ConfigError(f"exact.rows: unknown {bad}; choose from {list(ROWS)}")
        self.seeds = [int(s) for s in config.get("seeds", [0])]
        self.ablation_seeds = [int(s) for s in ab.get("seeds", self.seeds)]

    def jobs(self) -> list[tuple[str, str]]:
        """(row, technique): every row with the full recipe, then the ablation row's techniques."""
        return [(row, "full") for row in self.rows] + [("scd_exact", name) for name in self.ablations]

    def job_name(self, row: str, technique: str) -> str:
        return f"{row}-{technique}"

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
        out.update(C.flatten(self.cfg.get("overrides", {}) or {}))
        out.update(C.flatten((self.cfg.get("method_overrides", {}) or {}).get(method, {}) or {}))
        if row == "scd_exact":
            out.update(C.flatten((self.cfg.get("ablations", {}) or {}).get("overrides", {}) or {}))
        out.update(C.flatten((self.exact.get("row_overrides", {}) or {}).get(row, {}) or {}))
        if technique != "full":
            out.update(self.ablations[technique])
        out["run.seed"] = seed
        if row == "scd_exact":
            out["run.teacher_run_dir"] = EXACT_PREFIX + "data"
        elif row == "scd_learned":
            out["run.teacher_run_dir"] = str(self.run_dir(self.teacher_run()))
        return out

    def run_config(self, row: str, technique: str, seed: int) -> C.Config:
        cfg = C.resolve(self.cfg["dataset"], self.size, ROWS[row], self.overrides(row, technique, seed))
        # error-vs-iterations curves: the EMA network is scored `curve_points` times during training
        cfg.run.eval_kimg = cfg.run.total_kimg / int(self.exact.get("curve_points", 10))
        return cfg

    def job(self, row: str, technique: str) -> dict[str, Any]:
        """What `scm exact train` needs: every seed's run id, run directory and resolved config."""
        runs = []
        for seed in self.seeds_of(row):
            run_id = f"{self.job_name(row, technique)}-s{seed}"
            runs.append({"run_id": run_id, "seed": seed, "run_dir": str(self.run_dir(run_id)),
                         "config": C.to_dict(self.run_config(row, technique, seed))})
        return {"row": row, "technique": technique, "runs": runs,
                "curve_noises": int(self.exact.get("curve_noises", 256)),
                "sw_projections": int(self.exact.get("sw_projections", 256))}

    def reference_spec(self) -> dict[str, Any]:
        cfg = self.run_config("scd_exact", "full", 0)
        T = t_max(cfg.sigma_d, cfg.sampler.sigma_max)
        return {"data": C.to_dict(cfg)["data"], "sigma_d": cfg.sigma_d,
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
        cfg = C.resolve(self.cfg["dataset"], self.size, "scd", ov)
        return {"config": C.to_dict(cfg), "run_dir": str(self.run_dir("map2d-scd_exact-full-s0")),
                "points": int(m2.get("points", 300)), "ode_steps": int(self.exact.get("ode_steps", 400)), "seed": 0}

    def report_spec(self) -> dict[str, Any]:
        return {"study": self.cfg.get("study", "gmm"), "skip": self.skip,
                "jobs": [self.job_name(r, t) for r, t in self.jobs()]}

    def spec(self, name: str) -> dict[str, Any]:
        """The spec of a pipeline step, passed inline by its rule: 'reference', 'map2d', 'report' or
        'job-<row>-<technique>'."""
        if name == "reference":
            return self.reference_spec()
        if name == "map2d":
            return self.map2d_spec()
        if name == "report":
            return self.report_spec()
        for row, technique in self.jobs():
            if name == "job-" + self.job_name(row, technique):
                return self.job(row, technique)
        raise C.ConfigError(f"exact study: no step {name!r}; jobs: {[self.job_name(*j) for j in self.jobs()]}")


# ----------------------------------------------------------------------------
# One job: train every seed of one (row, technique) with the project's loop, then score it.


def run_job(job: dict[str, Any], ref: dict) -> dict[str, Any]:
    """Train (or resume; a finished run returns at once) and score every run of a job.

    The EMA network is scored on the first `curve_noises` reference noises every run.eval_kimg (the
    error-vs-iterations curve, kept in the run directory as exact_curve.json), the final EMA network
    on every metric.
    """
    from scm.checkpoint import atomic_write_json
    from scm.train import load_final, train

    out = []
    for run in job["runs"]:
        cfg = C.from_dict(run["config"])
        run_dir = Path(run["run_dir"])
        mixture = mixture_of(cfg)
        curve: list[dict] = []

        def on_eval(step, kimg, ema_model, cfg=cfg, curve=curve):
            err = one_step_errors(ema_model, ref, cfg.sigma_d, num=job["curve_noises"])
            curve.append({"step": step, "kimg": kimg, "err": err})

        status = train(cfg, run_dir, on_config_change="restart", on_eval=on_eval)
        curve_path = run_dir / "exact_curve.json"
        if curve:
            atomic_write_json(curve_path, curve)
        elif curve_path.exists():  # finished earlier: its curve was kept
            curve = json.loads(curve_path.read_text())
        net, _ = load_final(run_dir, "ema")
        metrics = evaluate(net, mixture, ref, cfg.sigma_d, job["sw_projections"])
        log.info("%s: one-step error %.4f, SW 2-step %.4f", run["run_id"], metrics["err_T"], metrics["sw_2step"])
        out.append({"run_id": run["run_id"], "seed": run["seed"], "state": status.get("state"),
                    "metrics": metrics, "curve": curve})
    return {"row": job["row"], "technique": job["technique"], "times": ref["times"], "runs": out}


def reference_from_spec(spec: dict[str, Any]) -> tuple[dict, dict]:
    """The reference of a study (what `scm exact reference` writes) and its floors."""
    cfg = C.Config()
    for key, value in C.flatten({"data": spec["data"]}).items():
        C.apply_override(cfg, key, value)
    cfg.sigma_d = spec["sigma_d"]
    mixture = mixture_of(cfg)
    ref = build_reference(mixture, spec["num"], spec["times"], spec["seed"], spec["ode_steps"])
    return ref, floors(mixture, ref, spec["sw_projections"])
