"""bench/gpu_checks.py and scm.bench.gpu on the CPU: the tangent hook its fp16 counts read, a short dry run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ToyNet

from scm.bench.gpu import GpuChecks, TangentCounter, accuracy
from scm.config import LossConfig
from scm.losses import ConsistencyLoss

ROOT = Path(__file__).resolve().parents[2]
SD = 0.5


def test_on_tangent_sees_every_step_and_leaves_the_loss_unchanged():
    net = ToyNet(4).double()
    x0 = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = LossConfig(jvp_impl="func")
    torch.manual_seed(1)
    plain, _ = ConsistencyLoss(cfg, SD)(net, x0)
    counter = TangentCounter()
    loss_fn = ConsistencyLoss(cfg, SD, on_tangent=counter)
    torch.manual_seed(1)
    observed, _ = loss_fn(net, x0)
    assert torch.equal(plain, observed)
    assert counter.calls == 1
    summary = counter.summary()
    assert summary["nonfinite_tangent_elems"] == 0 and summary["steps_nonfinite_tangent"] == 0
    assert summary["max_abs_tangent"] > 0


def test_tangent_counter_counts_nonfinite_elements():
    counter = TangentCounter()
    tan = type("T", (), {"cs_dF": torch.tensor([[1.0, float("nan")], [float("inf"), -3.0]])})()
    counter(tan)
    counter(type("T", (), {"cs_dF": torch.ones(2, 2)})())
    assert counter.summary() == {"nonfinite_tangent_elems": 2, "steps_nonfinite_tangent": 1,
                                 "max_abs_tangent": 3.0}


def test_a_failed_canary_skips_every_triton_launch():
    checks = GpuChecks(dry_run=True, triton_skipped="canary failed")
    rows = accuracy(checks)
    assert not checks.results["errors"] and checks.results["skipped"]
    assert all(r.get("skipped") or not r["pass"] for r in rows)


def test_importing_the_checks_does_not_import_triton():
    code = "import sys, scm.bench.gpu; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_dry_run_writes_the_summaries(tmp_path):
    """Two quick sections in Triton's interpreter; the full dry run (every section) takes minutes."""
    proc = subprocess.run([sys.executable, "bench/gpu_checks.py", "--dry-run", "--no-canary",
                           "--only", "hardware,accuracy", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert res["meta"]["dry_run"] and not res["errors"]
    assert res["hardware"]["triton_interpret"] == "1"
    checked = [r for r in res["accuracy"] if "pass" in r]
    assert checked and all(r["pass"] for r in checked)
    assert "### Fused flash-attention JVP: accuracy" in (tmp_path / "gpu_checks.md").read_text()
    assert "=== accuracy" in (tmp_path / "gpu_checks.log").read_text()
