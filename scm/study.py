"""A study: the grid of runs a pipeline trains and evaluates, decided up front from its config.

Run ids are `{method}-{size}-{ablation}-s{seed}` (e.g. `scd-tM-base-s0`, `sct-tS-tangent_warmup_off-s1`).
The main grid is methods x sizes x seeds with ablation `base`; the ablation grid runs each file of
ablations/ (only config overrides) against the full recipe (ablation `full`: no file, the same
grid settings) at one method and size with several seeds (default: sCD, the paper's preferred
method, seeds 0, 1, 2). `ablations.overrides` (e.g. a shorter schedule) apply to the whole ablation
grid, so ablations compare like with like.

sCD runs distill the teacher `teacher-{size}-base-s{teacher_seed}`. An ablation that changes the
network function (c_noise, time embedding, AdaGN) distills its own teacher `teacher-{size}-{ablation}-s
{teacher_seed}`: the same budget and seed as the base teacher, only the network change added, trained
once and shared by all seeds of that ablation. Distilling the base teacher into a changed student
instead would start the student from weights trained for another function (sCM Sec. 5: the CM is
initialized from its teacher) and measure that mismatch rather than the technique. The price is one
teacher per network ablation (4 in ablations/); `ablations.names` trims the grid where that is too much.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scm.config import Config, ConfigError, check_overrides, flatten, load_yaml, resolve, to_dict

RUN_ID = re.compile(r"^(?P<method>teacher|sct|scd)-(?P<size>[A-Za-z]+)-(?P<ablation>[a-z0-9_]+)-s(?P<seed>\d+)$")


# Network settings that leave the function (and its parameters) unchanged: no separate teacher needed.
FUNCTION_NEUTRAL = {"network.attention", "network.attn_block_size", "network.dropout", "network.label_dropout"}


@dataclass(frozen=True)
class Run:
    method: str
    size: str
    ablation: str
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.method}-{self.size}-{self.ablation}-s{self.seed}"


def parse_run_id(run_id: str) -> Run:
    m = RUN_ID.match(run_id)
    if not m:
        raise ConfigError(f"run id {run_id!r} is not of the form method-size-ablation-sSEED "
                          "(e.g. scd-tS-base-s0)")
    return Run(m["method"], m["size"], m["ablation"], int(m["seed"]))


def load_ablation(path: Path) -> dict[str, Any]:
    """An ablation file: dotted overrides only, checked against the config dataclasses."""
    return check_overrides(load_yaml(path, "ablation file"), str(path))


class Study:
    """The runs and settings of a study config (the dict Snakemake loads from config/*.yaml)."""

    def __init__(self, config: dict[str, Any], root: str | Path = "."):
        self.cfg = config
        self.root = Path(root)
        self.results = Path(config.get("results", "results"))
        ab = config.get("ablations", {}) or {}
        self.ablation_dir = self.root / ab.get("dir", "ablations")
        names = ab.get("names")
        if names is None:  # default: every file in the ablations folder
            names = sorted(p.stem for p in self.ablation_dir.glob("*.yaml"))
        self.ablations = {name: self._ablation_file(name) for name in names}

    def _ablation_file(self, name: str) -> dict[str, Any]:
        path = self.ablation_dir / f"{name}.yaml"
        if not path.exists():
            raise ConfigError(f"ablations.names: {name!r} has no file {path}")
        return load_ablation(path)

    # ------------------------------------------------------------------------
    # The grid.

    @property
    def dataset(self) -> str:
        return self.cfg["dataset"]

    def main_runs(self) -> list[Run]:
        return [Run(m, s, "base", seed) for m in self.cfg["methods"] for s in self.cfg["sizes"]
                for seed in self.cfg.get("seeds", [0])]

    def ablation_runs(self) -> list[Run]:
        ab = self.cfg.get("ablations", {}) or {}
        if not self.ablations:
            return []
        method, size = ab.get("method", "scd"), ab.get("size", self.cfg["sizes"][0])
        seeds = ab.get("seeds", [0, 1, 2])
        runs = [Run(method, size, "full", seed) for seed in seeds]
        return runs + [Run(method, size, name, seed) for name in self.ablations for seed in seeds]

    def teacher_of(self, run: Run) -> Run:
        seed = int(self.cfg.get("teacher_seed", 0))
        ablation = run.ablation if self._network_overrides(run.ablation) else "base"
        return Run("teacher", run.size, ablation, seed)

    def runs(self) -> list[Run]:
        """Every run to train, teachers of sCD runs included, without duplicates, in a stable order."""
        out: dict[str, Run] = {}
        for run in self.main_runs() + self.ablation_runs():
            if run.method == "scd":
                teacher = self.teacher_of(run)
                out.setdefault(teacher.run_id, teacher)
            out.setdefault(run.run_id, run)
        return list(out.values())

    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs()]

    # ------------------------------------------------------------------------
    # Paths and configs.

    def run_dir(self, run: Run | str) -> Path:
        run_id = run if isinstance(run, str) else run.run_id
        return self.results / "runs" / run_id

    def _network_overrides(self, ablation: str) -> dict[str, Any]:
        """The ablation's changes to the network function (an sCD teacher must share them)."""
        if ablation in ("base", "full"):
            return {}
        return {k: v for k, v in self.ablations[ablation].items()
                if k.startswith("network.") and k not in FUNCTION_NEUTRAL}

    def overrides(self, run: Run) -> dict[str, Any]:
        """Study-wide overrides, then the method's, then the ablation file's, then seed and teacher."""
        out: dict[str, Any] = {}
        out.update(flatten(self.cfg.get("overrides", {}) or {}))
        out.update(flatten((self.cfg.get("method_overrides", {}) or {}).get(run.method, {}) or {}))
        if run.ablation != "base" and run.method != "teacher":  # the ablation grid's own settings
            out.update(flatten((self.cfg.get("ablations", {}) or {}).get("overrides", {}) or {}))
        if run.ablation not in ("base", "full"):
            if run.ablation not in self.ablations:
                raise ConfigError(f"run {run.run_id}: unknown ablation {run.ablation!r}; "
                                  f"known: {sorted(self.ablations)}")
            # a teacher built for an ablation takes only its network changes
            extra = self.ablations[run.ablation] if run.method != "teacher" else self._network_overrides(run.ablation)
            out.update(extra)
        out["run.seed"] = run.seed
        if run.method == "scd":
            out["run.teacher_run_dir"] = str(self.run_dir(self.teacher_of(run)))
        return out

    def config(self, run_id: str) -> Config:
        run = parse_run_id(run_id)
        return resolve(self.dataset, run.size, run.method, self.overrides(run))

    def config_dict(self, run_id: str) -> dict[str, Any]:
        """The resolved config of a run as a plain dict (what `scm train --config` reads back)."""
        return to_dict(self.config(run_id))

    def eval_steps(self, run: Run | str) -> list[int]:
        """Sampling steps evaluated: 1- and 2-step (or more) for CMs, the solver steps for teachers."""
        run = parse_run_id(run) if isinstance(run, str) else run
        ev = self.cfg.get("eval", {}) or {}
        if run.method == "teacher":
            return [int(s) for s in ev.get("teacher_steps", [16])]
        return [int(s) for s in ev.get("cm_steps", [1, 2])]


def write_yaml(obj: Any, path: str | Path) -> None:
    """Write a config dict as YAML (atomically)."""
    from scm.fileio import atomic_write_bytes

    atomic_write_bytes(Path(path), yaml.safe_dump(obj, sort_keys=False).encode())
