# Wiring shared by the rules: the study object and paths. Logic lives in scm.study.
import json
import shlex
from pathlib import Path

from scm.metrics import shapes_extractor_path
from scm.study import Study, parse_run_id

STUDY = Study(config)
R = str(STUDY.results)
RUN_IDS = STUDY.run_ids()
LAUNCHER = config["launcher"]
CLUSTER_ARGS = f"--cluster {config['cluster']} --clusters {config['clusters']}" if LAUNCHER == "slurm" else ""


wildcard_constraints:
    run=r"(teacher|sct|scd)-[A-Za-z]+-[a-z0-9_]+-s\d+",


def teacher_final(wildcards):
    """sCD distills a finished teacher: its final.pt is an input."""
    run = parse_run_id(wildcards.run)
    if run.method != "scd":
        return []
    return f"{R}/runs/{STUDY.teacher_of(run).run_id}/final.pt"


def extractor_of(wildcards):
    """The shapes feature network of this run's renderer version (data.shapes_version); none for other data."""
    data = STUDY.config(wildcards.run).data
    return str(shapes_extractor_path(data.shapes_version, f"{R}/artifacts")) if data.name == "shapes" else []


# The exact-answer study (workflow/rules/gmm.smk; EXACT is defined there).
def exact_spec(name):
    """A step's spec (resolved run configs, evaluation settings) as one shell word: it is the rule's params,
    so a change re-runs the step (no spec files: each would be a job of its own)."""
    return lambda wc: shlex.quote(json.dumps(EXACT.spec(name.format(**dict(wc.items())))))


def exact_teacher_final(wildcards):
    """sCD from the learned teacher waits for the pipeline's teacher run."""
    if not wildcards.job.startswith("scd_learned"):
        return []
    return f"{R}/runs/{EXACT.teacher_run()}/final.pt"
