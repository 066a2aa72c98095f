#!/usr/bin/env python3
"""All GPU checks of scm-bench in one script (one short device call): correctness, timings, fp16 safety.

    PYTHONPATH=. python3 bench/gpu_checks.py --out $OUT                 # on the GPU machine
    .venv/bin/python bench/gpu_checks.py --dry-run --out /tmp/gpucheck   # here, on the CPU: every code path
                                                                         # at tiny sizes, kernels in Triton's
                                                                         # interpreter (TRITON_INTERPRET=1)

The checks themselves are scm.bench.gpu (sections hardware, accuracy, attention, network, training; see its
docstring). This script runs them: first a canary subprocess that launches every Triton kernel variant once
(a faulting kernel would kill this process's CUDA context; after a failed canary the Triton parts are skipped),
then each section, wrapped: a failure is recorded and the run goes on. gpu_checks.json and gpu_checks.md under
--out are rewritten after every logged line, so a run cut short still leaves what it measured; gpu_checks.log
holds the log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_checks_out", help="folder for gpu_checks.json / .md / .log")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU only: tiny sizes, Triton interpreter; exercises every code path")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft time budget in seconds (default 270; 3600 with --dry-run): optional parts are "
                        "skipped once it is spent")
    p.add_argument("--batch", type=int, default=16, help="batch of the size-S training steps")
    p.add_argument("--steps", type=int, default=10, help="measured training steps per setting")
    p.add_argument("--no-canary", action="store_true",
                   help="skip the subprocess that first launches the Triton kernels (guards this process's CUDA "
                        "context against a faulting kernel)")
    p.add_argument("--canary", action="store_true", help=argparse.SUPPRESS)  # internal: the canary itself
    p.add_argument("--only", default="", help="comma list of sections to run (hardware,accuracy,attention,"
                                              "training,network); default all")
    return p


def _canary(gpu, dry_run: bool) -> int:
    """The canary subprocess: one line 'CANARY {json}' or 'CANARY FAILED ...' on stdout."""
    try:
        print("CANARY " + json.dumps(gpu.canary(dry_run)), flush=True)
        return 0
    except Exception as exc:  # noqa: BLE001
        print(f"CANARY FAILED {type(exc).__name__}: {exc}"[:2000], flush=True)
        traceback.print_exc()
        return 1


def _run_canary(checks) -> None:
    """Run the canary; after a failure, Triton launches raise TritonSkipped (checks.triton_skipped)."""
    meta = checks.results["meta"]
    checks.say("canary: launching every Triton kernel variant once in a subprocess")
    cmd = [sys.executable, os.path.abspath(__file__), "--canary"] + (["--dry-run"] if checks.dry_run else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=str(ROOT))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CANARY")), "CANARY (no output)")
        ok = proc.returncode == 0 and line.startswith("CANARY {")
        meta["canary"] = {"ok": ok, "rc": proc.returncode, "line": line[:2000], "stderr_tail": proc.stderr[-3000:]}
    except subprocess.TimeoutExpired:
        ok, line = False, "CANARY timed out after 180 s"
        meta["canary"] = {"ok": False, "line": line}
    checks.say(f"canary: {'OK' if ok else 'FAILED'}: {line[:500]}")
    if not ok:
        why = f"Triton canary failed ({line[:200]}); Triton launches skipped to keep the CUDA context alive"
        checks.triton_skipped = why
        checks.results["errors"].append({"where": "canary", "error": why,
                                         "traceback": meta["canary"].get("stderr_tail", "")})


def _write_summary(gpu, checks, out: Path) -> None:
    checks.results["meta"]["elapsed_s"] = round(time.perf_counter() - checks.t0, 1)
    with open(out / "gpu_checks.json", "w") as f:
        json.dump(checks.results, f, indent=1, default=str)
    with open(out / "gpu_checks.md", "w") as f:
        f.write(gpu.markdown(checks.results))


class _Elapsed(logging.Formatter):
    """'[  12.3s] message': seconds since the run started."""

    def __init__(self, t0: float):
        super().__init__()
        self.t0 = t0

    def format(self, record: logging.LogRecord) -> str:
        return f"[{time.perf_counter() - self.t0:6.1f}s] {record.getMessage()}"


def _checks(gpu, checks, args, only: set[str], out: Path) -> int:
    if not checks.dry_run and not checks.cuda:
        checks.say("no CUDA device: nothing to measure (use --dry-run on a CPU machine)")
        checks.results["errors"].append({"where": "setup", "error": "no CUDA device"})
        return 2
    if checks.dry_run:
        checks.say(f"DRY RUN on CPU, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}: tiny sizes, "
                   "numbers meaningless")
    if (not only or only & gpu.TRITON_SECTIONS) and not args.no_canary:
        _run_canary(checks)
    gpu.run(checks, only)
    checks.say(f"wrote {out / 'gpu_checks.json'} and {out / 'gpu_checks.md'}")
    print("\n" + gpu.markdown(checks.results), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 3600.0 if args.dry_run else 270.0
    if args.dry_run:
        # Must be set before triton is imported: kernels then run in Triton's CPU interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from scm.bench import gpu  # after TRITON_INTERPRET (torch is imported here too)

    if args.canary:
        return _canary(gpu, args.dry_run)
    only = {s for s in args.only.split(",") if s}
    if unknown := only - set(gpu.SECTIONS):
        _parser().error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; "
                        f"choose from {', '.join(gpu.SECTIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = gpu.empty_results()
    results["meta"] = {"dry_run": args.dry_run, "argv": sys.argv[1:] if argv is None else list(argv),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    checks = gpu.GpuChecks(dry_run=args.dry_run, budget_s=args.budget_s, batch=args.batch, steps=args.steps,
                           results=results, t0=t0)
    checks.on_update = lambda: _write_summary(gpu, checks, out)
    logger = logging.getLogger(gpu.__name__)
    handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(out / "gpu_checks.log", mode="w")]
    for h in handlers:
        h.setFormatter(_Elapsed(t0))
        logger.addHandler(h)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        return _checks(gpu, checks, args, only, out)
    except BaseException as exc:  # record even KeyboardInterrupt / SystemExit, then re-raise
        checks.error("main", exc)
        raise
    finally:
        _write_summary(gpu, checks, out)
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
