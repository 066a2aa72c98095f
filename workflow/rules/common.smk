# Wiring shared by the rules: the study object and paths. Logic lives in scm.study.
from pathlib import Path

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
