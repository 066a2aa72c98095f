"""Session-wide test settings."""

import os

import torch

# Tiny networks on a 2-core machine: one thread per process is fastest and avoids oversubscription
# when tests start subprocesses (training jobs, submitit, snakemake). Subprocesses inherit the env.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# `scm` subprocesses run as processes of their own unless a test starts a fork server (test_forkserver.py).
os.environ.pop("SCM_SERVER", None)
