#!/usr/bin/env bash
# Per-worker entry on a TPU VM (started on every worker by launch/tpu_pod.sh).
# jax.distributed.initialize() auto-detects the pod slice (TPU_WORKER_HOSTNAMES is set on pod VMs);
# every worker runs the same command, reads only its shard of the data, and orbax writes
# checkpoints collectively, so WORKDIR must be shared storage (a gs:// bucket or a mounted filesystem).
#   launch/run_tpu.sh experiments/pretrain.py:size=xl gs://BUCKET/runs/xl [--config.key=value ...]
set -euo pipefail
config="$1"; workdir="$2"; shift 2
cd "$(dirname "$0")/.."
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/instructgpt_jax/xla}"
exec python3 -m instructgpt_jax.main --config="$config" --workdir="$workdir" "$@"
