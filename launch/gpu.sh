#!/usr/bin/env bash
# Run ares_jax on GPUs.
#
# One host, all its GPUs (one process sees every local GPU; the mesh spans them):
#   launch/gpu.sh --config=configs/aepo_7b.py --config.model.hf_path=/data/Qwen2.5-VL-7B-Instruct
#
# Several hosts: run the same command on every host with the jax.distributed environment set;
# main.py then calls jax.distributed.initialize() (JAX_COORDINATOR_ADDRESS is read by JAX,
# JAX_NUM_PROCESSES / JAX_PROCESS_ID by ares_jax.main). Under SLURM or Open MPI these are detected
# automatically and NNODES alone (any value > 1) is enough.
#   NNODES=2 NODE_RANK=0 COORDINATOR=10.0.0.1:1234 launch/gpu.sh --config=configs/aepo_7b.py ...
#   NNODES=2 NODE_RANK=1 COORDINATOR=10.0.0.1:1234 launch/gpu.sh --config=configs/aepo_7b.py ...
#
# Environment: NNODES (default 1), NODE_RANK, COORDINATOR (host:port of rank 0),
# CUDA_VISIBLE_DEVICES (which GPUs), PYTHON (default python3).
set -euo pipefail

cd "$(dirname "$0")/.."
NNODES="${NNODES:-1}"
PYTHON="${PYTHON:-python3}"
if [ "$#" -eq 0 ]; then
  set -- --config=configs/tiny.py
fi

# Let XLA use most of the GPU memory up front and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

if [ "$NNODES" -gt 1 ]; then
  if [ -z "${SLURM_JOB_ID:-}" ] && [ -z "${OMPI_COMM_WORLD_SIZE:-}" ]; then
    : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on every host}"
    : "${COORDINATOR:?set COORDINATOR=host:port of the rank-0 host}"
    export JAX_COORDINATOR_ADDRESS="$COORDINATOR"
    export JAX_NUM_PROCESSES="$NNODES"
    export JAX_PROCESS_ID="$NODE_RANK"
  fi
  exec "$PYTHON" -m ares_jax.main "$@" --config.distributed=True
fi
exec "$PYTHON" -m ares_jax.main "$@"
