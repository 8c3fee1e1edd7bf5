#!/usr/bin/env bash
# Run a config on this machine: all local devices (CPU, one or more GPUs, or a single TPU host).
#   launch/local.sh experiments/pretrain.py:size=tiny runs/tiny [--config.key=value ...]
set -euo pipefail
config="$1"; workdir="$2"; shift 2
exec python -m instructgpt_jax.main --config="$config" --workdir="$workdir" "$@"
