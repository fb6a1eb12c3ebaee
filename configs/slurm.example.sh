#!/bin/bash
# Train DREAM-H on 4 nodes x 8 GPUs with SLURM: one task per GPU, started by srun (no deepspeed
# launcher, no ssh). Each task reads its rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID;
# MASTER_ADDR defaults to the first host of the job's node list (set here explicitly as well).
#
# 120 s before the time limit SLURM sends SIGUSR1 to every task (DataLoader workers ignore it):
# each rank finishes its step, writes a checkpoint and exits 0; this script then requeues the job,
# which resumes from OUT/checkpoints/latest (--resume auto). Preemption and node failure requeue
# through --requeue. See docs/training.md, "Running at scale: faults and data".
#
#   sbatch configs/slurm.example.sh        (edit the #SBATCH lines, CONFIG, OUT and the shards first)
#
#SBATCH --job-name=dream-h-cc12m
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

CONFIG=${CONFIG:-configs/dream_h_cc12m.yaml}
OUT=${OUT:-runs/dream_h_cc12m}
TOKENIZER=${TOKENIZER:-data/cc12m-tokenizer.json}  # trained once before the first launch:
#   dream-fast tokenizer --shards "/data/cc12m/{00000..01242}.tar" --vocab-size 49408 --out "$TOKENIZER"

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))  # the same on every task (the default, too)
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# --kill-on-bad-exit: one failed rank ends the step instead of leaving the others in a collective
# (which train.dist_timeout_s would end after 30 minutes anyway)
srun --kill-on-bad-exit=1 python -m dream_fast.train --no-progress --config "$CONFIG" --out "$OUT" \
    --resume auto data.tokenizer_path="$TOKENIZER" train.dist_timeout_s=1800

# Stopped by the signal (not finished): run the rest in a new allocation.
if python -c "import json, sys; sys.exit(json.load(open('$OUT/last_run.json'))['stopped_by'] != 'signal')"; then
    scontrol requeue "$SLURM_JOB_ID"
fi
