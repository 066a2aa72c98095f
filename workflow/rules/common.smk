# Wiring shared by the rules: the study object and paths. Logic lives in scm.study.
import json
import shlex
import sys
from pathlib import Path

from scm.config import ConfigError
from scm.evaluate import study_eval_inputs
from scm.launch import get_profile
from scm.extractors import shapes_extractor_path
from scm.study import Study, parse_run_id

STUDY = Study(config)
RESULTS = str(STUDY.results)
RUN_IDS = STUDY.run_ids()
LAUNCHER = config["launcher"]
CLUSTER_ARGS = (
    f"--cluster {config['cluster']} --clusters {config['clusters']}"
    if LAUNCHER == "slurm"
    else ""
)

# Evaluation: its inputs (decoder, Inception, DINOv2, reference statistics) exist now, or the DAG is not
# built (one line naming the key and the path), never after training. Its jobs use the eval profile.
EVAL = config["eval"]
try:
    EVAL_INPUTS = (
        study_eval_inputs(STUDY.config(RUN_IDS[0]).data, EVAL) if RUN_IDS else {}
    )
except ConfigError as e:
    sys.exit(
        f"{', '.join(map(str, workflow.overwrite_configfiles)) or 'config/config.yaml'}: {e}"
    )
EVAL_CLUSTER = config.get("eval_cluster") or config["cluster"]
EVAL_GPUS = 0
if LAUNCHER == "slurm":
    _profile = get_profile(config["clusters"], EVAL_CLUSTER)
    EVAL_GPUS = _profile.gpus_per_node * _profile.nodes
# On SLURM the tasks use their profile's CPUs; here (debug, local) one thread per job.
EVAL_LAUNCH = f"--launcher {LAUNCHER} --shards {EVAL['shards']}" + (
    f" --cluster {EVAL_CLUSTER} --clusters {config['clusters']}"
    if LAUNCHER == "slurm"
    else " --threads 1"
)


wildcard_constraints:
    run=r"(teacher|sct|scd)-[A-Za-z]+-[a-z0-9_]+-s\d+",


def teacher_final(wildcards):
    """sCD distills a finished teacher: its final.pt is an input."""
    run = parse_run_id(wildcards.run)
    if run.method != "scd":
        return []
    return f"{RESULTS}/runs/{STUDY.teacher_of(run).run_id}/final.pt"


def extractor_of(wildcards):
    """The shapes feature network of this run's renderer version (data.shapes_version); none for other data."""
    data = STUDY.config(wildcards.run).data
    return (
        str(shapes_extractor_path(data.shapes_version, f"{RESULTS}/artifacts"))
        if data.name == "shapes"
        else []
    )


def reference_of(wildcards):
    """Real-image data without imported statistics: the dataset's reference statistics, computed once."""
    data = STUDY.config(wildcards.run).data
    if data.name == "shapes" or data.channels == 4 or EVAL_INPUTS.get("ref_stats"):
        return []
    return f"{RESULTS}/ref-stats/{data.name}-fid.npz"


def eval_args(wildcards, input):
    """The evaluation's inputs and sampler as `scm evaluate` flags (the study's eval section)."""
    run = parse_run_id(wildcards.run)
    weights = input.extractor or EVAL_INPUTS.get("inception")
    args = [f"--extractor-weights {shlex.quote(str(weights))}" if weights else ""]
    for key, flag in (("vae", "--vae"), ("ref_stats", "--ref-stats")):
        if EVAL_INPUTS.get(key):
            args.append(f"{flag} {shlex.quote(EVAL_INPUTS[key])}")
    if EVAL.get("fd_dinov2"):
        args.append(f"--dinov2 {shlex.quote(EVAL_INPUTS['dinov2'])}")
    return " ".join(a for a in args if a) + sampler_args(run)


def sampler_args(run):
    """Teacher runs: the study's solver and guidance (eval.teacher_solver / teacher_guidance) where given."""
    if run.method != "teacher":
        return ""
    solver, guidance = EVAL.get("teacher_solver"), EVAL.get("teacher_guidance")
    return (f" --solver {solver}" if solver else "") + (
        f" --guidance {guidance}" if guidance is not None else ""
    )


# The exact-answer study (workflow/rules/gmm.smk; EXACT is defined there).
def exact_spec(name):
    """A step's spec (resolved run configs, evaluation settings) as one shell word: it is the rule's params,
    so a change re-runs the step (no spec files: each would be a job of its own)."""
    return lambda wc: shlex.quote(
        json.dumps(EXACT.spec(name.format(**dict(wc.items()))))
    )


def exact_teacher_final(wildcards):
    """The training group with sCD from the learned teacher waits for the pipeline's teacher run."""
    if not EXACT.needs_teacher(wildcards.group):
        return []
    return f"{RESULTS}/runs/{EXACT.teacher_run()}/final.pt"
