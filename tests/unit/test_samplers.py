"""Samplers against an accurate RK4 solve of a Gaussian mixture's exact PF-ODE."""

import math

import pytest
import torch
from conftest import ExactConsistencyNet, ExactVelocityNet

from scm.samplers import cm_times, consistency_sample, teacher_sample, teacher_times
from scm.trigflow import sigma_to_t

SD = 0.5


def _reference(gmm, noise):
    t_max = torch.full((noise.shape[0],), sigma_to_t(80.0, SD), dtype=torch.float64)
    return gmm.ode(SD * noise, t_max, torch.zeros_like(t_max), steps=400)


@pytest.mark.parametrize("solver,steps,nfe", [("euler", 18, 18), ("heun", 18, 35), ("dpm2s", 18, 35),
                                              ("dpm2s", 32, 63)])
def test_teacher_nfe_matches_the_paper(gmm, solver, steps, nfe):
    noise = torch.randn(4, 4, dtype=torch.float64)
    _, n = teacher_sample(ExactVelocityNet(gmm), noise, SD, solver=solver, steps=steps)
    assert n == nfe  # DPM-Solver-2S: CIFAR 18 steps -> NFE 35, ImageNet 32 steps -> NFE 63


def test_guided_teacher_counts_two_evaluations(gmm):
    noise = torch.randn(4, 4, dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    _, n = teacher_sample(ExactVelocityNet(gmm), noise, SD, labels=labels, steps=32, guidance=1.5)
    assert n == 126  # sCM Figure 1: 63 steps with CFG = 126


@pytest.mark.parametrize("solver", ["heun", "dpm2s"])
def test_second_order_solvers_converge_to_the_exact_ode(gmm, solver):
    noise = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = _reference(gmm, noise)
    errs = []
    for steps in (12, 48):
        x, _ = teacher_sample(ExactVelocityNet(gmm), noise, SD, solver=solver, steps=steps)
        errs.append(((x - ref).norm() / ref.norm()).item())
    assert errs[1] < 1e-2 and errs[1] < errs[0] / 4


def test_euler_is_worse_than_dpm2s_at_equal_nfe(gmm):
    noise = torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _reference(gmm, noise)
    euler, _ = teacher_sample(ExactVelocityNet(gmm), noise, SD, solver="euler", steps=63)
    dpm, _ = teacher_sample(ExactVelocityNet(gmm), noise, SD, solver="dpm2s", steps=32)
    assert (dpm - ref).norm() < (euler - ref).norm()


def test_one_step_with_the_exact_consistency_function_solves_the_ode(gmm):
    noise = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x, nfe = consistency_sample(ExactConsistencyNet(gmm, steps=400), noise, SD, steps=1)
    assert nfe == 1
    assert ((x - _reference(gmm, noise)).norm() / x.norm()) < 1e-4


def test_two_step_times_and_multistep():
    assert cm_times(1, 80.0, SD) == [pytest.approx(1.56454, abs=1e-5)]
    assert cm_times(2, 80.0, SD)[1] == 1.1
    ts = cm_times(4, 80.0, SD)
    assert len(ts) == 4 and ts[1] == 1.1 and all(a > b for a, b in zip(ts, ts[1:]))


def test_two_step_with_exact_consistency_lands_on_the_data(gmm):
    noise = torch.randn(256, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x, nfe = consistency_sample(ExactConsistencyNet(gmm, steps=200), noise, SD, steps=2,
                                generator=torch.Generator().manual_seed(4))
    assert nfe == 2
    # every sample sits near one mixture component (within a few of its std)
    d = (x[:, None, :] - gmm.means[None]).norm(dim=-1) / gmm.stds[None]
    assert (d.min(dim=1).values < 4 * math.sqrt(4)).float().mean() > 0.97


def test_teacher_times_are_decreasing_and_end_at_zero():
    ts = teacher_times(18, SD)
    assert ts[-1] == 0.0 and ts[0] == pytest.approx(sigma_to_t(80.0, SD)) and len(ts) == 19
    assert all(a > b for a, b in zip(ts, ts[1:]))
