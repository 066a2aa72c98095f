"""Hyperparameter sweeps with Optuna: a sweep file, N workers on one storage, outputs for the pipeline.

A sweep file (config/sweeps/*.yaml, parsed by scm.sweep_spec) declares the search space over config
fields (dotted keys), the base run every trial trains (dataset x size x method + fixed overrides), the
objective (FID of the EMA network at 1 or 2 consistency steps), the direction, sampler, pruner, trial
budget and storage.

    OUT/journal.log         the Optuna study: JournalStorage (several processes on one filesystem), or an RDB URL
    OUT/trials/<number>/    one training run per trial (the storage numbers trials: decidable up front)
    OUT/trials.csv          study.trials_dataframe()
    OUT/best.yaml           the best trial's complete config overrides: dataset, size, method, the study's
                            base overrides and the searched params (`scm train --config best.yaml`)
    OUT/figures/*.png       optimization history, parallel coordinates, importances, intermediate values
    OUT/workers/<stamp>/    submitit logs of the worker processes / jobs

One coordinating process (run_sweep) prepares the Optuna study, marks trials left RUNNING by a crashed run as
FAIL (journal files have no heartbeat), then starts the workers (run_worker: in-process, local
subprocesses or a SLURM job array), which optimize the same Optuna study until the trial budget is spent.

Crashes:
- A journal file whose last record is torn (a crash mid-append, a full disk) is repaired when it is opened:
  the torn record is dropped (no reader ever applied it), the original is kept as journal.log.<stamp>.bak
  and a warning names both. A torn record that a later append was glued to loses the torn part only.
  Anything else unreadable in a journal is a one-line error naming the file and line.
- A storage without the study while OUT holds an earlier study's outputs (trials.csv, best.yaml, trials/),
  e.g. an emptied or deleted journal, is refused: a new study would overwrite them. --restart (restart=True)
  moves them aside (<name>.<stamp>.bak) and starts afresh.
- Local and SLURM workers run run_worker in a child process (supervise_worker), so that a worker killed by
  a signal (kill -9, the OOM killer) is reported as "worker N ... killed by SIGKILL". A trial still RUNNING
  after every worker ended (its worker was killed) is counted in the summary ('running') and the sweep
  ends with an error; the next run marks it FAIL and runs its params again (retry_stale).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from scm.config import ConfigError, config_hash, resolve_from_dict
from scm.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from scm.sweep_spec import SweepSpec, base_config, suggest, trial_dir

log = logging.getLogger(__name__)

# The budget counts trials that finished or are running (waiting retries still run; see TrialBudget).
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
STALE_REASON = "stale after restart"


class SweepError(RuntimeError):
    """A sweep that could not produce its outputs (no completed trial, budget not reached, unreadable storage);
    `summary` is run_sweep's summary when the outputs were written."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


class WorkerError(RuntimeError):
    """A worker process that ended without finishing its share: killed by a signal, or failed."""


# ----------------------------------------------------------------------------
# Storage, sampler, pruner.


def is_url(storage: str) -> bool:
    return "://" in storage


def resolve_storage(spec: SweepSpec, out: str | Path) -> str:
    """An RDB URL as given, or the absolute path of the journal file (default OUT/journal.log)."""
    if spec.storage and is_url(spec.storage):
        return spec.storage
    return str(Path(spec.storage or Path(out) / "journal.log").resolve())


# Optuna's JournalFileBackend writes one JSON object per line, "op_code" first, and appends under a lock.
RECORD_START = b'{"op_code":'


def _is_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False
    return isinstance(record, dict) and "op_code" in record


def _is_torn(piece: bytes) -> bool:
    """The start of a record cut short, or the zeros/blanks a crash leaves at the end of a file."""
    head = piece[:len(RECORD_START)]
    return RECORD_START.startswith(head) or not piece.strip(b"\x00 \t\r")


def _repaired_journal(path: Path, data: bytes) -> tuple[bytes | None, list[str]]:
    """(contents without torn records, what was dropped), or (None, []) when the journal is intact.

    A torn record at the end (no newline, or undecodable) is dropped: Optuna's reader skips a last line
    without a newline, so no process applied it, but the next append would be glued to it and make the
    file unreadable for good (optuna.storages.journal.JournalFileBackend.read_logs). A line that is a torn
    record with a complete one glued to it (such an append) keeps the complete record."""
    *lines, tail = data.split(b"\n")  # tail: the bytes after the last newline (b"" when complete)
    ok = [_is_record(line) for line in lines]
    last_good = max((i for i, good in enumerate(ok) if good), default=-1)
    kept, dropped = [], []
    for i, line in enumerate(lines):
        if ok[i]:
            kept.append(line)
            continue
        # The first record start after which the rest of the line decodes (a nested dict may hold "op_code").
        start = line.find(RECORD_START, 1)
        while start > 0 and not _is_record(line[start:]):
            start = line.find(RECORD_START, start + 1)
        if start > 0 and _is_torn(line[:start]):
            kept.append(line[start:])
            dropped.append(f"line {i + 1}: a torn record of {start} bytes glued to the next one")
        elif not line.strip(b"\x00 \t\r") or (i > last_good and _is_torn(line)):
            dropped.append(f"line {i + 1}: a torn record of {len(line)} bytes")
        else:
            raise SweepError(f"{path}: line {i + 1} is not an Optuna journal record ({line[:60]!r}); repair or "
                             "move the file by hand")
    if tail:
        if not _is_torn(tail):
            raise SweepError(f"{path}: the last line is not an Optuna journal record ({tail[:60]!r}); repair or "
                             "move the file by hand")
        dropped.append(f"line {len(lines) + 1}: a torn record of {len(tail)} bytes (no newline)")
    if not dropped:
        return None, []
    return b"".join(line + b"\n" for line in kept), dropped


def _aside(path: Path, stamp: str) -> Path:
    """PATH.<stamp>.bak, or PATH.<stamp>-<k>.bak when that exists."""
    target, k = path.with_name(f"{path.name}.{stamp}.bak"), 1
    while target.exists():
        target, k = path.with_name(f"{path.name}.{stamp}-{k}.bak"), k + 1
    return target


def repair_journal(path: str | Path) -> list[str]:
    """Drop torn records from a journal file (see _repaired_journal), keeping the original as
    PATH.<stamp>.bak; returns what was dropped. SweepError (naming the file) when it cannot be read."""
    from optuna.storages.journal import JournalFileSymlinkLock

    path = Path(path)
    try:
        repaired, _ = _repaired_journal(path, path.read_bytes())
        if repaired is None:
            return []
        # Under the lock that JournalFileBackend appends under (its default): no append is half done.
        lock = JournalFileSymlinkLock(str(path))
        lock.acquire()
        try:
            data = path.read_bytes()
            repaired, dropped = _repaired_journal(path, data)
            if repaired is None:
                return []
            backup = _aside(path, time.strftime("%Y%m%d-%H%M%S"))
            shutil.copy2(path, backup)
            if data.startswith(repaired):  # in place: readers' offsets of the records before stay valid
                os.truncate(path, len(repaired))
            else:
                atomic_write_bytes(path, repaired, mode=path.stat().st_mode & 0o7777)
        finally:
            lock.release()
    except OSError as e:
        raise SweepError(f"{path}: cannot read or repair the journal: {e.strerror or e}") from None
    log.warning("%s: repaired the journal (a crash mid-append or a full disk): dropped %s; the original is "
                "kept as %s", path, "; ".join(dropped), backup)
    return dropped


def open_journal(path: str | Path):
    """JournalStorage on a journal file (created when missing), torn records repaired first."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_file():
        raise SweepError(f"{path}: the journal is not a file")
    if path.exists():
        repair_journal(path)
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as e:
        raise SweepError(f"{path}: cannot open the journal: {e.strerror or e}") from None
    except Exception as e:  # Optuna replays every record here: a record it cannot apply
        raise SweepError(f"{path}: not a readable Optuna journal ({type(e).__name__}: {e}); repair or move the "
                         "file by hand") from None


def make_storage(storage: str, spec: SweepSpec):
    """JournalStorage on a file, or RDBStorage with heartbeats (killed workers' trials fail and are retried)."""
    if not is_url(storage):
        return open_journal(storage)
    if storage.startswith("sqlite"):
        log.warning("SQLite is not safe for several workers or network filesystems: use a journal file or "
                    "PostgreSQL/MySQL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = (optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.retry_stale)
                 if spec.retry_stale else None)
        return optuna.storages.RDBStorage(storage, heartbeat_interval=spec.heartbeat_interval,
                                          grace_period=spec.grace_period, heartbeat_stale_trial_callback=retry)


def make_sampler(spec: SweepSpec, worker: int = 0) -> optuna.samplers.BaseSampler:
    s = spec.sampler
    seed = None if s.seed is None else s.seed + worker
    try:
        if s.name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **s.options)
        if s.name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **s.options)
        if s.name == "grid":
            grid = {k: list(p.choices) for k, p in spec.space.items()}
            return optuna.samplers.GridSampler(grid, seed=seed, **s.options)
        if s.name == "cmaes":
            _require("cmaes", "sampler 'cmaes' needs the cmaes package")
            return optuna.samplers.CmaEsSampler(seed=seed, **s.options)
        _require("scipy", "sampler 'gp' needs scipy (and torch)")
        return optuna.samplers.GPSampler(seed=seed, **s.options)
    except TypeError as e:  # an option the sampler does not take
        raise ConfigError(f"sampler.options for {s.name!r}: {e}") from None


def _require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what}: pip install 'scm-bench[sweeps]' (or pip install {module})")


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    P = optuna.pruners
    kind = {"median": P.MedianPruner, "hyperband": P.HyperbandPruner, "none": P.NopPruner}[spec.pruner.name]
    try:
        return kind(**spec.pruner.options)
    except TypeError as e:
        raise ConfigError(f"pruner.options for {spec.pruner.name!r}: {e}") from None


# ----------------------------------------------------------------------------
# The trial budget.


class TrialBudget(optuna.study.MaxTrialsCallback):
    """MaxTrialsCallback that also counts RUNNING trials (other workers' trials in flight) and keeps
    going while trials WAIT (retries of stale trials): the total stops at n_trials, up to a race of a
    few milliseconds when two workers finish at the same instant (then at most workers - 1 extra)."""

    def __init__(self, n_trials: int):
        super().__init__(n_trials, states=COUNTED)

    def reached(self, optuna_study: optuna.Study) -> bool:
        trials = optuna_study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return False
        return sum(t.state in COUNTED for t in trials) >= self._n_trials

    def remaining(self, optuna_study: optuna.Study) -> int:
        """Trials still to run: new ones up to the budget, and at least every waiting one."""
        trials = optuna_study.get_trials(deepcopy=False)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        return max(self._n_trials - sum(t.state in COUNTED for t in trials), waiting)

    def __call__(self, optuna_study: optuna.Study, trial) -> None:
        if self.reached(optuna_study):
            optuna_study.stop()


# ----------------------------------------------------------------------------
# The objective: train the trial's run, report FIDs of the EMA network, return the final FID.


class TrainingObjective:
    """FID at spec.objective.steps of the trial's EMA network after a short sCT/sCD run in OUT/trials/N.

    Every run.eval_kimg, train() calls back: the FID on eval_num_samples seeds is reported to the pruner,
    and a pruned trial stops training (StopTraining -> optuna.TrialPruned). Picklable (workers run it)."""

    def __init__(self, spec: SweepSpec, out: str | Path):
        # Paths absolute in the coordinator's directory: SLURM workers may start elsewhere.
        from scm import extractors

        absolute = lambda p: str(Path(p).resolve()) if p else p
        o = spec.objective
        extractor = o.extractor or extractors.default_extractor(spec.base.dataset)
        if not o.extractor_weights and extractor == extractors.SHAPES_EXTRACTOR:
            # the extractor of the base run's renderer version (the pipeline's artifact path)
            o = dataclasses.replace(o, extractor_weights=str(extractors.shapes_extractor_path(
                base_config(spec).data.shapes_version)))
        spec = dataclasses.replace(spec, objective=dataclasses.replace(
            o, cache_dir=absolute(o.cache_dir), extractor_weights=absolute(o.extractor_weights)),
            base=dataclasses.replace(spec.base, teacher_run_dir=absolute(spec.base.teacher_run_dir)))
        self.spec, self.out, self._ref = spec, str(Path(out).resolve()), None

    def __getstate__(self):
        return {**self.__dict__, "_ref": None}  # the reference (real images) is rebuilt per process

    def reference(self, cfg):
        from scm import evaluate, metrics

        if self._ref is None:
            o = self.spec.objective
            shapes_version = cfg.data.shapes_version if cfg.data.name == "shapes" else None
            self._ref = metrics.make_reference(cfg.data.name, evaluate.real_images(cfg.data), o.extractor,
                                               o.extractor_weights, o.cache_dir, shapes_version=shapes_version)
        return self._ref

    def prepare(self) -> None:
        """In the coordinator, before workers start: the teacher is finished; the reference statistics
        (and the shapes extractor) exist, so that workers only read them."""
        from scm import evaluate, metrics
        from scm.train import load_final

        cfg = base_config(self.spec)
        if cfg.run.method == "scd" and not cfg.run.teacher_run_dir.startswith("exact:"):
            load_final(Path(cfg.run.teacher_run_dir), "ema")  # raises TeacherNotReadyError with a hint
        metrics.reference_stats(self.reference(cfg), str(evaluate.resolve_device(cfg.run.device)))

    def fid(self, net, cfg, num: int) -> float:
        from scm import evaluate, metrics

        o = self.spec.objective
        device = evaluate.resolve_device(cfg.run.device)
        images, _ = evaluate.generate(net, cfg, list(range(num)), o.steps, batch=min(o.batch, num), device=device)
        return metrics.compute_metrics(images, self.reference(cfg), kid=False, prc=False, device=str(device))["fid"]

    def __call__(self, trial: optuna.Trial) -> float:
        from scm.evaluate import resolve_device
        from scm.train import DivergedError, StopTraining, load_final, train

        cfg = base_config(self.spec, suggest(trial, self.spec.space))
        run_dir = trial_dir(self.out, trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("config_hash", config_hash(cfg))  # best.yaml checks that it reproduces it
        # Trial numbers are unique in a study: a directory already there is from a study started afresh.
        if run_dir.exists():
            log.warning("removing %s left by an earlier study", run_dir)
            shutil.rmtree(run_dir)

        eval_seconds = [0.0]  # sampling and scoring (scm bench overhead counts it as the trial's work)

        def scored(net, num: int) -> float:
            t = time.time()
            value = self.fid(net, cfg, num)
            eval_seconds[0] += time.time() - t
            trial.set_user_attr("eval_seconds", round(eval_seconds[0], 3))
            return value

        def on_eval(step: int, kimg: float, ema) -> None:
            # Intermediate FID for the pruner; a non-finite one is a diverged run.
            value = scored(ema, self.spec.objective.eval_num_samples)
            if not math.isfinite(value):
                raise DivergedError(f"non-finite FID {value} at step {step}")
            trial.report(value, step)
            if trial.should_prune():
                raise StopTraining(f"pruned at step {step} ({kimg:.2f} kimg): FID {value:.4g}")

        t0 = time.time()
        try:
            train(cfg, run_dir, on_eval=on_eval)
        except StopTraining as e:
            trial.set_user_attr("reason", str(e))
            trial.set_user_attr("seconds", round(time.time() - t0, 2))
            raise optuna.TrialPruned(str(e)) from None
        net, _ = load_final(run_dir, "ema", resolve_device(cfg.run.device))
        value = scored(net, self.spec.objective.num_samples)
        trial.set_user_attr("seconds", round(time.time() - t0, 2))
        return value


# ----------------------------------------------------------------------------
# A worker: optimize the shared Optuna study until the budget is spent.


def _guard(objective: Callable[[optuna.Trial], float]) -> Callable[[optuna.Trial], float]:
    """The reason of every pruned or failed trial in user_attrs['reason']; non-finite values fail."""
    from scm.train import DivergedError

    where = f"{socket.gethostname()}:{os.getpid()}"

    def run(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", where)
        try:
            value = objective(trial)
        except optuna.TrialPruned as e:
            if "reason" not in trial.user_attrs:
                trial.set_user_attr("reason", str(e) or "pruned")
            raise
        except DivergedError as e:
            trial.set_user_attr("reason", f"diverged: {e}")
            raise
        except Exception as e:
            trial.set_user_attr("reason", f"{type(e).__name__}: {e}")
            raise
        if value is None or not math.isfinite(value):
            trial.set_user_attr("reason", f"non-finite objective value {value!r}")
            return float("nan")  # Optuna records the trial as FAIL and goes on
        return float(value)

    return run


def _exit_with(pid: int, poll_s: float = 1.0) -> None:
    """Local workers end with their coordinator, so a restart never marks a live trial stale."""
    def watch():
        while True:
            time.sleep(poll_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                log.error("coordinator %d is gone: worker %d exits", pid, os.getpid())
                os._exit(3)
            except PermissionError:
                pass

    threading.Thread(target=watch, daemon=True, name="coordinator-watch").start()


def run_worker(spec: SweepSpec, storage: str, objective: Callable[[optuna.Trial], float], worker: int = 0,
               coordinator_pid: int | None = None) -> list[int]:
    """One worker (in the coordinator's process for the debug launcher, else in supervise_worker's child):
    load the Optuna study and optimize it until the budget is spent. Diverged or infeasible trials fail and the
    worker goes on. Returns the trial numbers it ran."""
    import torch

    from scm.train import DivergedError

    if not logging.getLogger().handlers:  # a job's entry point: show progress in the job log
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if coordinator_pid:
        _exit_with(coordinator_pid)
    optuna_study = optuna.load_study(study_name=spec.name, storage=make_storage(storage, spec),
                              sampler=make_sampler(spec, worker), pruner=make_pruner(spec))
    budget, ran = TrialBudget(spec.n_trials), []
    if budget.reached(optuna_study):
        return ran
    optuna_study.optimize(_guard(objective), callbacks=[lambda s, t: ran.append(t.number), budget],
                   catch=(DivergedError, ConfigError, torch.OutOfMemoryError), gc_after_trial=True)
    log.info("worker %d ran trials %s", worker, ran)
    return ran


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """A supervised worker ends with its supervisor (killed: the child is handed to another parent)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.error("supervisor %d is gone: worker %d exits", parent, os.getpid())
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="supervisor-watch").start()


def _supervised(conn, spec: SweepSpec, storage: str, objective: bytes, worker: int,
                coordinator_pid: int | None) -> None:
    """The child of supervise_worker: run_worker, its result or error sent back through `conn`."""
    import pickle

    _exit_with_parent()
    try:
        ran = run_worker(spec, storage, pickle.loads(objective), worker, coordinator_pid)
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise
    conn.send(("ok", ran))


def supervise_worker(spec: SweepSpec, storage: str, objective: bytes, worker: int = 0,
                     coordinator_pid: int | None = None) -> list[int]:
    """The entry point of local and SLURM workers: run_worker in a child process, so that a worker killed by
    a signal (kill -9, the OOM killer) is reported as such (only a parent learns the signal; submitit's
    local jobs run under a controller process that drops it). `objective` comes pickled (cloudpickle) and
    is unpickled in the child only: the supervisor stays small (no torch). Raises WorkerError."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or signal handlers
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_supervised, args=(send, spec, storage, objective, worker, coordinator_pid),
                        name=f"sweep-worker-{worker}")
    child.start()
    send.close()
    try:
        child.join()
    finally:
        if child.is_alive():  # the supervisor was interrupted (a cancelled job): stop the worker too
            child.terminate()
            child.join(30)
    try:
        message = receive.recv() if receive.poll() else None
    except EOFError:  # the child ended without a word
        message = None
    where = f"worker {worker} (pid {child.pid} on {socket.gethostname()})"
    if child.exitcode is not None and child.exitcode < 0:
        raise WorkerError(f"{where} killed by {signal.Signals(-child.exitcode).name}")
    if message is None or message[0] != "ok" or child.exitcode != 0:
        raise WorkerError(f"{where} failed: {message[1] if message else f'exit code {child.exitcode}'}")
    return message[1]


def _worker_error(worker: int, job, error: Exception) -> str:
    """One line for a worker job that raised or ended without a result: the WorkerError's words (killed by
    which signal) or the job's last exception, else its scheduler state; never a line of its log."""
    import submitit

    text = str(error)
    if isinstance(error, submitit.core.utils.FailedJobError):
        # submitit: "... with trace:\n-----\n<traceback>\n-----\nYou can check full logs ..."
        trace = text.split("-" * 22)[1] if text.count("-" * 22) >= 2 else text
        last = trace.strip().splitlines()[-1] if trace.strip() else "failed"
        if last.startswith(f"{WorkerError.__module__}.WorkerError: "):
            return f"{last.split(': ', 1)[1]} (job {job.job_id}, log {job.paths.stderr})"
        return f"worker {worker} (job {job.job_id}) failed: {last} (log {job.paths.stderr})"
    return f"worker {worker} (job {job.job_id}) ended without a result, state {job.state} (log {job.paths.stderr})"


# ----------------------------------------------------------------------------
# The coordinator.


EARLIER_OUTPUTS = ("trials.csv", "best.yaml", "trials")  # what a study leaves in OUT
MOVED_ON_RESTART = EARLIER_OUTPUTS + ("figures",)       # and its default figures folder


def _move_aside(paths: list[Path], stamp: str) -> None:
    for p in paths:
        if p.exists():
            os.replace(p, _aside(p, stamp))


def open_study(spec: SweepSpec, storage: str, restart: bool = False, out: str | Path | None = None) -> optuna.Study:
    """Create the Optuna study or load it. One declared differently (space, base, objective, direction) is an
    error, and so is a storage without the study while OUT holds an earlier study's outputs (an emptied or
    deleted journal: a new study would overwrite them); restart moves the old journal (a file holding only
    this study) and the outputs aside and starts afresh."""
    backend = make_storage(storage, spec)
    if out is None and not is_url(storage):
        out = Path(storage).parent
    out = Path(out) if out is not None else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if spec.name not in optuna.get_all_study_names(backend) and out is not None:
        earlier = [out / name for name in EARLIER_OUTPUTS if (out / name).exists()]
        if earlier and not restart:
            raise SweepError(f"{storage} holds no study {spec.name!r}, but {out} holds the outputs of an earlier "
                             f"one ({', '.join(p.name for p in earlier)}): was the journal emptied or deleted? "
                             "Start afresh with --restart (moves them aside) or use another --out")
        if earlier:
            log.warning("%s holds no study %r: moving the earlier outputs in %s aside (.%s.bak)", storage, spec.name,
                        out, stamp)
            _move_aside([out / name for name in MOVED_ON_RESTART], stamp)
    optuna_study = optuna.create_study(study_name=spec.name, storage=backend, direction=spec.direction,
                                load_if_exists=True)
    old = optuna_study.user_attrs.get("spec")
    if old is not None and old != spec.identity():
        diff = sorted(k for k in spec.identity() if old.get(k) != spec.identity()[k])
        if not restart:
            raise ConfigError(f"study {spec.name!r} in {storage} was declared with other {diff}; start it "
                              "afresh with --restart, or use another --out / name")
        if is_url(storage) or optuna.get_all_study_names(backend) != [spec.name]:
            raise ConfigError(f"--restart: {storage} holds other studies too; rename this study (name:) "
                              "or delete it by hand")
        log.warning("study changed (%s): moving %s and its outputs aside (.%s.bak)", diff, storage, stamp)
        _move_aside([Path(storage)] + [out / name for name in MOVED_ON_RESTART], stamp)
        return open_study(spec, storage, out=out)
    if old is None:
        optuna_study.set_user_attr("spec", spec.identity())
    return optuna_study


def fail_stale_trials(optuna_study: optuna.Study, storage: optuna.storages.BaseStorage, retry: int = 1) -> list[int]:
    """Mark every RUNNING trial FAIL (reason 'stale after restart') and enqueue its params again (up to
    `retry` times). Journal files have no heartbeat: call this only in the coordinating process, before
    any worker of this study runs. `storage` is the study's storage (Optuna's public storage API: a
    Study does not expose its own)."""
    stale = optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    study_id = storage.get_study_id_from_name(optuna_study.study_name)
    for t in stale:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        # The reason first: a finished trial's attributes can no longer be set.
        storage.set_trial_user_attr(trial_id, "reason", STALE_REASON)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        retries = t.user_attrs.get("retries", 0)
        if retries < retry and t.params:
            optuna_study.enqueue_trial(t.params, user_attrs={"retry_of": t.user_attrs.get("retry_of", t.number),
                                                      "retries": retries + 1})
    if stale:
        log.warning("marked stale trials %s FAIL (%s)", [t.number for t in stale], STALE_REASON)
    return [t.number for t in stale]


def _wait_for_previous_jobs(out: Path) -> None:
    """SLURM workers outlive a killed coordinator: wait for those still queued or running."""
    import submitit

    from scm.launch import ACTIVE_SLURM_STATES

    info_path = out / "workers.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if info.get("launcher") != "slurm":
        return
    for job_id in info["job_ids"]:
        job = submitit.SlurmJob(folder=info["folder"], job_id=job_id)
        while job.state in ACTIVE_SLURM_STATES:
            log.info("waiting for worker job %s of an earlier run (%s)", job_id, job.state)
            time.sleep(30)


def _launch(spec: SweepSpec, storage: str, objective, n: int, launcher: str, profile, out: Path) -> list[str]:
    """n workers: in this process (debug: one), local subprocesses or a SLURM job array; returns errors."""
    from scm import launch

    if launcher == "debug":
        if n > 1:
            log.info("debug launcher: one worker in this process (instead of %d)", n)
        run_worker(spec, storage, objective, 0)
        return []
    import cloudpickle
    import submitit

    # One task per worker (a profile's DDP tasks would each optimize the study); local: no short limit.
    default = launch.ClusterProfile(time_min=7 * 24 * 60) if launcher == "local" else launch.ClusterProfile()
    profile = dataclasses.replace(profile or default, nodes=1, tasks_per_node=1)
    folder = out / "workers" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    ex = launch.make_executor(launcher, folder, profile, job_name=f"scm-sweep-{spec.name}")
    if launcher == "slurm":
        ex.update_parameters(array_parallelism=n)
    pid = os.getpid() if launcher == "local" else None
    pickled = cloudpickle.dumps(objective)  # unpickled by the supervised child only (supervise_worker)
    jobs = ex.map_array(supervise_worker, [spec] * n, [storage] * n, [pickled] * n, list(range(n)), [pid] * n)
    atomic_write_json(out / "workers.json", {"launcher": launcher, "folder": str(folder),
                                             "job_ids": [j.job_id for j in jobs]})
    log.info("%d %s workers: %s (logs in %s)", n, launcher, [j.job_id for j in jobs], folder)
    errors = []
    for worker, job in enumerate(jobs):
        try:
            job.result()
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
            errors.append(_worker_error(worker, job, e))
            log.error("%s", errors[-1])
    return errors


def run_sweep(spec: SweepSpec, out: str | Path, workers: int = 1, launcher: str = "local", profile=None,
              objective: Callable[[optuna.Trial], float] | None = None, figures: str | Path | None = None,
              restart: bool = False) -> dict:
    """Run (or continue) the study with `workers` workers, then write trials.csv, best.yaml and figures.

    objective defaults to TrainingObjective(spec, out); any picklable callable(trial) -> float works.
    Returns a summary; raises SweepError (after writing what it can) when no trial completed or the
    budget was not reached."""
    t0 = time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = resolve_storage(spec, out)
    if launcher == "slurm":
        _wait_for_previous_jobs(out)
    optuna_study = open_study(spec, storage, restart, out)
    if is_url(storage):  # RDB: trials whose heartbeat stopped fail (and are retried) before counting
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(optuna_study)
    else:
        backend = make_storage(storage, spec)
        fail_stale_trials(optuna.load_study(study_name=spec.name, storage=backend), backend, spec.retry_stale)
    objective = objective or TrainingObjective(spec, out)
    budget = TrialBudget(spec.n_trials)
    n = min(max(1, workers), budget.remaining(optuna_study))
    errors = []
    if n > 0:
        if hasattr(objective, "prepare"):
            objective.prepare()
        errors = _launch(spec, storage, objective, n, launcher, profile, out)
    else:
        log.info("study %s already has its %d trials", spec.name, spec.n_trials)
    optuna_study = optuna.load_study(study_name=spec.name, storage=make_storage(storage, spec))
    summary = write_outputs(optuna_study, spec, out, Path(figures or spec.figures or out / "figures"))
    summary.update({"storage": storage, "seconds": round(time.time() - t0, 2), "worker_errors": errors})
    details = "".join(f"\n{e}" for e in errors)
    if summary["complete"] == 0:
        raise SweepError(f"study {spec.name!r}: no trial completed ({summary['pruned']} pruned, "
                         f"{summary['fail']} failed); see {summary['trials_csv']}" + details, summary)
    # Every worker of this run ended: a trial still RUNNING lost its worker (the budget counted it).
    left = [t.number for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    if left and n > 0:
        raise SweepError(f"study {spec.name!r}: trials {left} left RUNNING by a killed worker, so the budget of "
                         f"{spec.n_trials} is not met; run the same command again to retry them" + details, summary)
    if budget.remaining(optuna_study) > 0:
        raise SweepError(f"study {spec.name!r}: {budget.remaining(optuna_study)} trials of {spec.n_trials} still to "
                         "run (run the same command again to continue)" + details, summary)
    return summary


# ----------------------------------------------------------------------------
# Outputs.


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'optim.lr': x} -> {'optim': {'lr': x}} (the inverse of scm.config.flatten)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    return out


def best_overrides(spec: SweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """Every override a trial trained with (dotted keys): the base run's dataset, size and method (and
    teacher, absolute as TrainingObjective passes it), the study's base overrides, then the trial's params.
    resolve_from_dict of them is base_config(spec, params): the trial's run config."""
    b = spec.base
    teacher = {"run.teacher_run_dir": str(Path(b.teacher_run_dir).resolve())} if b.method == "scd" else {}
    return {"data.name": b.dataset, "run.size": b.size, "run.method": b.method, **b.overrides, **teacher,
            **params}


def write_best_yaml(optuna_study: optuna.Study, spec: SweepSpec, path: str | Path) -> Path:
    """The best trial's complete config as nested overrides (best_overrides), so that `scm train --config
    THIS_FILE` trains exactly the trial's config; trial, value and config hash in a header."""
    best, path = optuna_study.best_trial, Path(path)
    overrides = best_overrides(spec, best.params)
    cfg_hash = config_hash(resolve_from_dict(nest(overrides)))
    if best.user_attrs.get("config_hash", cfg_hash) != cfg_hash:  # recorded by TrainingObjective
        log.warning("%s: trial %d ran config %s, its overrides now resolve to %s (presets changed since?)",
                    path, best.number, best.user_attrs["config_hash"], cfg_hash)
    counts = {s.name.lower(): len(optuna_study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    header = [f"# Best trial of sweep study '{spec.name}' (scm sweep): every config override it trained with",
              "# (dataset, size, method, the study's base overrides, and the searched params "
              f"{', '.join(best.params)}).",
              f"# Train it again: scm train --config THIS_FILE --run-dir DIR (config hash {cfg_hash}); as",
              "# --overrides THIS_FILE, use a --config that sets only the same dataset, size and method.",
              f"# trial {best.number}: FID at {spec.objective.steps} step(s) = {best.value:.6g} ({spec.direction})",
              f"# base run: {spec.base.dataset} {spec.base.size} {spec.base.method}; trials: "
              + ", ".join(f"{v} {k}" for k, v in counts.items())]
    atomic_write_text(path, "\n".join(header) + "\n" + yaml.safe_dump(nest(overrides), sort_keys=True))
    return path


def write_figures(optuna_study: optuna.Study, out_dir: str | Path) -> list[str]:
    """PNG plots through optuna.visualization.matplotlib; each one guarded (importances need >= 2
    completed trials and may fail): a plot that cannot be drawn is logged and skipped."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # headless workers and pipelines
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    complete = len(optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots = {"history": vis.plot_optimization_history, "parallel_coordinate": vis.plot_parallel_coordinate,
             "param_importances": vis.plot_param_importances, "intermediate_values": vis.plot_intermediate_values}
    written = []
    for name, plot in plots.items():
        if name == "param_importances" and complete < 2:
            log.info("figure %s skipped: needs >= 2 completed trials (%d)", name, complete)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental API; degenerate axes of tiny studies
                ax = plot(optuna_study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(str(path))
        except Exception as e:  # a plot is a convenience: never fail the sweep for it
            log.warning("figure %s skipped: %s: %s", name, type(e).__name__, e)
    return written


def write_outputs(optuna_study: optuna.Study, spec: SweepSpec, out: Path, figures: Path) -> dict:
    """trials.csv always; best.yaml and figures once a trial completed. Returns the summary."""
    df = optuna_study.trials_dataframe()
    atomic_write_text(out / "trials.csv", df.to_csv(index=False))
    count = lambda s: len(optuna_study.get_trials(deepcopy=False, states=(s,)))
    # running: left RUNNING by a killed worker once every worker ended; waiting: retries not yet run.
    summary = {"study": spec.name, "n_trials": spec.n_trials, "trials": len(optuna_study.trials),
               "complete": count(TrialState.COMPLETE), "pruned": count(TrialState.PRUNED),
               "fail": count(TrialState.FAIL), "running": count(TrialState.RUNNING),
               "waiting": count(TrialState.WAITING), "trials_csv": str(out / "trials.csv"), "best_yaml": None,
               "best_trial": None, "best_value": None, "best_params": None, "figures": []}
    if summary["complete"]:
        best = optuna_study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                       best_yaml=str(write_best_yaml(optuna_study, spec, out / "best.yaml")))
        summary["figures"] = write_figures(optuna_study, figures)
    return summary
