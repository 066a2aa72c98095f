"""Fixtures for tests that need the real single-node SLURM cluster (tests/slurm/cluster.sh)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CLUSTER_SH = HERE / "cluster.sh"


@dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to know about the running cluster."""

    script: Path
    state: Path
    partition: str = "debug"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items: mark only the ones under tests/slurm.
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The cluster must already be up (`tests/slurm/cluster.sh up`); fail in CI, skip elsewhere."""
    try:
        proc = subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True, text=True, timeout=30)
        ok, detail = proc.returncode == 0, proc.stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, detail = False, repr(exc)
    if not ok:
        reason = f"SLURM test cluster is not up: run tests/slurm/cluster.sh up (needs root on Debian)\n{detail}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return SlurmCluster(script=CLUSTER_SH, state=Path(os.environ.get("SCM_SLURM_STATE", "/tmp/scm-slurm")))
