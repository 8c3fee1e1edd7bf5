"""Memory planning without allocating: `--config.dry_run=True`.

Builds the train state with jax.eval_shape on the configured mesh (an AbstractMesh when the mesh
is larger than the devices present, e.g. a 175B config on a laptop), prints parameter and
optimizer bytes per device, and lowers the step ahead of time (AOT). When the mesh fits the local
devices the step is also compiled and XLA's own per-device memory analysis is printed.
"""
from __future__ import annotations

import math
import time

import jax
import numpy as np
from jax.sharding import AbstractMesh

GiB = 2.0**30


def bytes_per_device(abstract_tree) -> int:
    """Sum over leaves of the bytes of one device's shard."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def activation_bytes_estimate(config, local_batch: int) -> float:
    """Activation memory of one device, per Korthikanti et al. 2022 (§4): s·b·h·(34 + 5·a·s/h) bytes
    per layer at 16-bit without recomputation, divided by tensor parallelism; 2·s·b·h with full remat."""
    m, s = config.model, config.train.seq_len
    t = config.mesh.tensor if config.mesh.tensor > 0 else 1
    per_layer = s * local_batch * m.d_model * (34 + 5 * m.n_heads * s / m.d_model) / t
    if m.remat == "full":
        per_layer = 2 * s * local_batch * m.d_model
    scale = 2.0 if m.dtype == "float32" else 1.0
    return per_layer * m.n_layers * scale


def report(config, mesh, abstract_state, step_fn, abstract_batch, log=print) -> dict:
    from instructgpt_jax.train import sharding

    """Prints and returns the per-device memory plan; lowers (and, when possible, compiles) step_fn."""
    devices = math.prod(mesh.shape.values())
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    plan = {
        "mesh": dict(mesh.shape),
        "params_gib": bytes_per_device(abstract_state.params) / GiB,
        "optimizer_gib": bytes_per_device(abstract_state.opt_state) / GiB,
        "gradients_gib": bytes_per_device(abstract_state.params) / GiB,
        "activations_estimate_gib": activation_bytes_estimate(config, config.train.batch_size // batch_shards) / GiB,
    }
    log(f"dry run on a {dict(mesh.shape)} mesh ({devices} devices), per device: "
        f"params {plan['params_gib']:.2f} GiB, optimizer {plan['optimizer_gib']:.2f} GiB, "
        f"gradients {plan['gradients_gib']:.2f} GiB, activations ~{plan['activations_estimate_gib']:.2f} GiB "
        f"(estimate, local batch {config.train.batch_size // batch_shards} x {config.train.seq_len})")
    start = time.perf_counter()
    platform = jax.devices()[0].platform
    with sharding.sharding_context(mesh, sharding.rules(config)):
        lowered = step_fn.__wrapped__.trace(abstract_state, abstract_batch).lower(lowering_platforms=(platform,))
    plan["lower_s"] = time.perf_counter() - start
    log(f"step lowered ahead of time for {platform} in {plan['lower_s']:.1f}s")
    if not isinstance(mesh, AbstractMesh):
        compiled = lowered.compile()
        mem = compiled.memory_analysis()
        if mem is not None:
            plan["xla_temp_gib"] = mem.temp_size_in_bytes / GiB
            plan["xla_argument_gib"] = mem.argument_size_in_bytes / GiB
            log(f"compiled: XLA per-device arguments {plan['xla_argument_gib']:.3f} GiB, "
                f"temporaries {plan['xla_temp_gib']:.3f} GiB")
    return plan
