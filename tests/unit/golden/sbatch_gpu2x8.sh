#!/bin/bash

# Parameters
#SBATCH --account=my-account
#SBATCH --constraint=h100
#SBATCH --cpus-per-task=8
#SBATCH --error='/shared/runs/it'"'"'s a run/jobs/%j_0_log.err'
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=scm-scd-XL
#SBATCH --mem=491520M
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output='/shared/runs/it'"'"'s a run/jobs/%j_0_log.out'
#SBATCH --partition=gpu
#SBATCH --qos=normal
#SBATCH --signal=USR2@120
#SBATCH --time=2880
#SBATCH --wckey=submitit

# setup
module load cuda/12.4
export NCCL_DEBUG=WARN

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output '/shared/runs/it'"'"'s a run/jobs/%j_%t_log.out' --error '/shared/runs/it'"'"'s a run/jobs/%j_%t_log.err' PYTHON -u -m submitit.core._submit '/shared/runs/it'"'"'s a run/jobs'
