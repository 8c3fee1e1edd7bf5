"""`parallelism = "pmap"`: pure data parallelism with a replicated state and `lax.pmean`-style
gradient averaging — the classic path, kept because some users and accelerators still want it.

It gives the numbers of the mesh path: each device's loss is a mean over its `weight` (tokens,
pairs, …; the loss function may report it as metrics["weight"], default 1), and gradients and
metrics are averaged with those weights, which equals the gradient of the global mean.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from instructgpt_jax.train.state import learning_rate_schedule, make_optimizer

AXIS = "devices"


def replicate(tree, devices=None):
    """One copy of every leaf per local device (leading axis = device)."""
    devices = devices or jax.local_devices()
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(devices),) + jnp.shape(x)), tree)
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    return jax.device_put(stacked, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS)))


def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch, n_devices: int):
    """[B, ...] -> [n_devices, B / n_devices, ...]."""
    return jax.tree.map(lambda x: x.reshape((n_devices, x.shape[0] // n_devices) + x.shape[1:]), batch)


def weighted_mean(tree, weight):
    """Σ_d w_d·x_d / Σ_d w_d across devices."""
    total = jax.lax.psum(weight, AXIS)
    return jax.tree.map(lambda x: jax.lax.psum(x * weight, AXIS) / total, tree)


def make_pmap_update_step(loss_fn, config, ema_decay=None, devices=None):
    """`(replicated_state, global_batch) -> (replicated_state, metrics)`, the state donated."""
    from instructgpt_jax.train.steps import apply_update

    devices = devices or jax.local_devices()
    tx = make_optimizer(config.optim)
    schedule = learning_rate_schedule(config.optim)

    def step(state, batch):
        # Dropout masks differ per device, as they do for different rows of one global batch.
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXIS))
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        weight = jnp.asarray(metrics.pop("weight", 1.0), jnp.float32)
        grads, loss, metrics = weighted_mean((grads, loss, metrics), weight)
        new_state, update_metrics = apply_update(state, grads, tx, ema_decay, loss=loss)
        return new_state, {**metrics, **update_metrics, "loss": loss, "lr": schedule(state.step)}

    pstep = jax.pmap(step, axis_name=AXIS, devices=devices, donate_argnums=0)

    def call(state, batch):
        state, metrics = pstep(state, split_batch(batch, len(devices)))
        return state, unreplicate(metrics)

    return call
