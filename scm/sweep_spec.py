"""The sweep file (config/sweeps/*.yaml): strict dataclasses, every key and value checked up front.

A sweep file declares the search space over config fields (dotted keys), the base run every trial trains
(dataset x size x method + fixed overrides), the objective (FID of the EMA network at 1 or 2 consistency
steps), the direction, the Optuna sampler and pruner, the trial budget and the storage. Unknown keys are
errors naming the file and the key. scm.sweep runs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from scm.config import REF_STATS_DIR, Config, ConfigError, check_overrides, flatten, load_yaml, resolve

SAMPLERS = ("tpe", "random", "gp", "cmaes", "grid")
PRUNERS = ("median", "hyperband", "none")
PARAM_TYPES = ("float", "int", "categorical")
METHODS = ("sct", "scd")
# The run's identity comes from the base run, not from the search space.
FIXED_KEYS = {"data.name", "run.method", "run.size", "run.teacher_run_dir"}


# ----------------------------------------------------------------------------
# The sweep file: strict dataclasses (unknown keys are errors naming the file and the key).


@dataclass(frozen=True)
class Param:
    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None


@dataclass
class BaseRun:
    dataset: str = "shapes"
    size: str = "tS"
    method: str = "sct"
    teacher_run_dir: str = ""
    overrides: dict = field(default_factory=dict)


@dataclass
class ObjectiveSpec:
    steps: int = 1                       # consistency steps of the FID (1 or 2)
    num_samples: int = 256               # samples for the trial's final FID
    eval_num_samples: int = 128          # samples for the FIDs reported every run.eval_kimg (pruning)
    batch: int = 256                     # sampling batch
    extractor: str | None = None         # None = scm.metrics' default for the dataset
    extractor_weights: str | None = None
    cache_dir: str = REF_STATS_DIR


@dataclass
class OptunaSamplerSpec:
    """The Optuna sampler of a sweep (TPE, random, CMA-ES) and its options; not a diffusion sampler."""
    name: str = "tpe"
    seed: int | None = 0                 # worker i uses seed + i (distinct random startup trials)
    options: dict = field(default_factory=dict)


@dataclass
class PrunerSpec:
    name: str = "median"
    options: dict = field(default_factory=dict)


@dataclass
class SweepSpec:
    name: str
    base: BaseRun
    space: dict[str, Param]
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    direction: str = "minimize"
    sampler: OptunaSamplerSpec = field(default_factory=OptunaSamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    n_trials: int = 8
    storage: str | None = None           # None = OUT/journal.log; a path = a journal file; or an RDB URL
    retry_stale: int = 1                 # re-run a stale (crashed) trial's params up to this many times
    heartbeat_interval: int = 60         # RDB storages only
    grace_period: int = 180
    figures: str | None = None           # None = OUT/figures

    def identity(self) -> dict:
        """What makes two sweep files the same Optuna study (the budget, storage and plots may change)."""
        objective = {k: v for k, v in dataclasses.asdict(self.objective).items() if k != "cache_dir"}
        return json.loads(json.dumps({"base": dataclasses.asdict(self.base), "direction": self.direction,
                                      "objective": objective,
                                      "space": {k: dataclasses.asdict(p) for k, p in self.space.items()}}))


def _build(cls, raw: Any, where: str):
    """cls(**raw) with unknown keys reported by name."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(raw) - known)
    if bad:
        raise ConfigError(f"{where}: unknown keys {bad}; known: {sorted(known)}")
    return cls(**raw)


def _space_items(raw: dict, prefix: str = ""):
    """Dotted or nested keys down to the parameter declarations (mappings with a 'type')."""
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "type" not in v:
            yield from _space_items(v, key + ".")
        else:
            yield key, v


def _parse_param(key: str, raw: Any, where: str) -> Param:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: space.{key}: expected a mapping like {{type: float, low: 0.1, high: 1}}")
    p = _build(Param, {"key": key, **raw}, f"{where}: space.{key}")
    if key in FIXED_KEYS:
        raise ConfigError(f"{where}: space.{key}: set it in base, it cannot be searched")
    if p.type not in PARAM_TYPES:
        raise ConfigError(f"{where}: space.{key}: type {p.type!r}; choose one of {list(PARAM_TYPES)}")
    if p.choices is not None or p.type == "categorical":
        if not isinstance(p.choices, (list, tuple)) or not p.choices:
            raise ConfigError(f"{where}: space.{key}: give a non-empty list of choices")
        values = list(p.choices)
        p = dataclasses.replace(p, choices=tuple(p.choices))
    else:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (p.low, p.high)):
            raise ConfigError(f"{where}: space.{key}: {p.type} needs numbers low and high (or choices)")
        if not p.low < p.high:
            raise ConfigError(f"{where}: space.{key}: low {p.low} must be below high {p.high}")
        if p.log and (p.low <= 0 or p.step is not None):
            raise ConfigError(f"{where}: space.{key}: log needs low > 0 and no step")
        if p.type == "int" and not all(float(v).is_integer() for v in (p.low, p.high, p.step or 1)):
            raise ConfigError(f"{where}: space.{key}: int needs integer low, high and step")
        values = [p.low, p.high]
    # Every value the sampler may pick must be a valid value of the config field (type and range).
    for v in values:
        check_overrides({key: v}, f"{where}: space.{key}")
    return p


def parse_spec(raw: dict, name: str = "sweep", where: str = "sweep file") -> SweepSpec:
    """A SweepSpec from the sweep file's contents; every key and value checked up front."""
    raw = dict(raw or {})
    for key in ("base", "space"):
        if key not in raw:
            raise ConfigError(f"{where}: missing '{key}'")
    space_raw = raw.pop("space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise ConfigError(f"{where}: space: declare at least one parameter")
    base = _build(BaseRun, raw.pop("base"), f"{where}: base")
    spec = _build(SweepSpec, {"name": name, **raw, "base": base,
                              "space": {k: _parse_param(k, v, where) for k, v in _space_items(space_raw)}}, where)
    spec.objective = _build(ObjectiveSpec, raw.get("objective"), f"{where}: objective")
    spec.sampler = _build(OptunaSamplerSpec, raw.get("sampler"), f"{where}: sampler")
    spec.pruner = _build(PrunerSpec, raw.get("pruner"), f"{where}: pruner")
    spec.base.overrides = flatten(spec.base.overrides or {})
    # Choices and ranges that the code below relies on.
    checks = [(spec.base.method in METHODS, f"base.method: {spec.base.method!r}; choose one of {list(METHODS)}"),
              (spec.base.method != "scd" or spec.base.teacher_run_dir, "base.teacher_run_dir: sCD needs the "
                                                                        "run directory of a finished teacher"),
              (spec.direction in ("minimize", "maximize"), f"direction: {spec.direction!r}; minimize or maximize"),
              (spec.sampler.name in SAMPLERS, f"sampler.name: {spec.sampler.name!r}; one of {list(SAMPLERS)}"),
              (spec.pruner.name in PRUNERS, f"pruner.name: {spec.pruner.name!r}; one of {list(PRUNERS)}"),
              (isinstance(spec.n_trials, int) and spec.n_trials >= 1, "n_trials: a positive integer"),
              (spec.objective.steps >= 1 and spec.objective.num_samples >= 2 and spec.objective.eval_num_samples >= 2,
               "objective: steps >= 1 and num_samples, eval_num_samples >= 2"),
              (spec.sampler.name != "grid" or all(p.choices for p in spec.space.values()),
               "sampler grid: every space parameter needs a list of choices"),
              (not set(spec.space) & set(spec.base.overrides),
               f"space and base.overrides both set {sorted(set(spec.space) & set(spec.base.overrides))}")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")
    if spec.sampler.name == "grid":  # a grid has as many trials as points at most
        size = math.prod(len(p.choices) for p in spec.space.values())
        spec.n_trials = min(spec.n_trials, size)
    try:
        base_config(spec)
    except ConfigError as e:
        raise ConfigError(f"{where}: base: {e}") from None
    return spec


def load_spec(path: str | Path, n_trials: int | None = None, storage: str | None = None) -> SweepSpec:
    """The sweep file at `path` (name defaults to the file's stem); n_trials/storage override it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--sweep-file: {path} not found")
    raw = load_yaml(path, "--sweep-file")
    if n_trials is not None:
        raw["n_trials"] = n_trials
    if storage:
        raw["storage"] = storage
    return parse_spec(raw, name=str(raw.pop("name", path.stem)), where=str(path))


def base_config(spec: SweepSpec, params: dict[str, Any] | None = None) -> Config:
    """The resolved config of a trial: preset, base overrides, the teacher, then the trial's params."""
    b = spec.base
    extra = {"run.teacher_run_dir": b.teacher_run_dir} if b.method == "scd" else {}
    return resolve(b.dataset, b.size, b.method, {**b.overrides, **extra, **(params or {})})


def suggest(trial: optuna.Trial, space: dict[str, Param]) -> dict[str, Any]:
    """The trial's values of every space parameter (Optuna param names = the dotted config keys)."""
    out = {}
    for key, p in space.items():
        if p.choices is not None:
            out[key] = trial.suggest_categorical(key, list(p.choices))
        elif p.type == "int":
            out[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            out[key] = trial.suggest_float(key, float(p.low), float(p.high), step=p.step, log=p.log)
    return out


def trial_dir(out: str | Path, number: int) -> Path:
    return Path(out) / "trials" / str(number)
