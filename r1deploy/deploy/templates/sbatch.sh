#!/bin/bash
# r1deploy serve for $model on $nodes node(s) x $gpus GPU(s), written by `r1deploy plan --emit slurm`.
# Submit: sbatch $script   (the same checkpoint at $model_path on every node)
#SBATCH --job-name=r1deploy-$name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --cpus-per-task=$cpus
#SBATCH --mem=$mem
#SBATCH --exclusive
#SBATCH --output=r1deploy-%j.log
set -euo pipefail

# serve reads SLURM_NNODES, SLURM_NODEID, MASTER_ADDR and MASTER_PORT (one task per node): node 0 runs
# rank 0 and the HTTP server on port $port, the other nodes their ranks.
export MASTER_ADDR="$$(scontrol show hostnames "$$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT=$master_port
$env
echo "r1deploy: serving on http://$${MASTER_ADDR}:$port/v1 once ready"
srun --kill-on-bad-exit=1 $command
