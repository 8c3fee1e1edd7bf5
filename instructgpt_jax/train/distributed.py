"""Multi-host start-up: `jax.distributed.initialize()` when the launch environment asks for it."""
from __future__ import annotations

import os

import jax

# Set by launch/ scripts (or by the user) to join a multi-process run.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"


def wants_distributed() -> bool:
    """True on TPU pod slices, under SLURM with several tasks, or when a coordinator is given explicitly."""
    if os.environ.get(COORDINATOR_ENV):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def maybe_initialize() -> None:
    if not wants_distributed() or jax.distributed.is_initialized():
        return
    if os.environ.get(COORDINATOR_ENV):
        jax.distributed.initialize(
            coordinator_address=os.environ[COORDINATOR_ENV],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()  # auto-detects TPU pods and SLURM
