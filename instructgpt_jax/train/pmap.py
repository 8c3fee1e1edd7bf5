"""`parallelism = "pmap"`: pure data parallelism. Every device holds the whole train state, computes the
loss and gradients of its own rows of the batch, the gradients are averaged across devices with a
named-axis collective, and every device applies the same optimizer update: the classic `jax.pmap` +
`lax.pmean` program.

It is written as `jax.shard_map` over the mesh's batch axes with pmap's semantics (per-device code,
explicit collectives, `check_vma=False`; JAX's own `jax.pmap` now lowers to exactly this), inside a jit
with the mesh path's shardings. So the state stays an ordinary fully replicated jax.Array on the
(data=N, 1, 1) mesh between steps (no stacked device axis, no copy per step), checkpoints, samplers and
evaluation see plain params, and the step has the mesh path's `(state, batch) -> (state, metrics)`.

The numbers equal the mesh path's. A per-device mean over a per-device number of items (response tokens,
prompts with a pair) is combined with those numbers as weights, so the loss is the global mean and the
update its gradient. A loss function declares them in its metrics (the steps strip them):

  WEIGHTS: {name: weight}: "loss" or the metric `name` is a mean over `weight` items of the device's rows;
           unnamed metrics take the loss's weight, which defaults to 1 (equal rows on every device);
           TOTAL marks a count, summed across devices.
  TERMS:   {metric: coefficient}: the loss is Σ coefficient·metric, sums of means over different items
           (response tokens + pretraining rows): each term is combined with its own weight, and the
           device's gradient is that of Σ coefficient·(weight / global weight)·term.

Metrics that are not means (explained variance) come out as the weighted mean of the devices' values.
Dropout masks are drawn per device (fold_in(rng, axis_index)): as random as the mesh path's, not the same draw.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from instructgpt_jax.train import sharding

WEIGHTS = "pmap_weights"
TERMS = "pmap_loss_terms"
TOTAL = None  # a WEIGHTS entry: the metric is a count over the device's rows, summed across devices
AXES = sharding.BATCH_AXES  # the mesh axes the batch rows are split over (mesh.fsdp is 1 under pmap)


def strip_declarations(metrics: dict) -> dict:
    """The metrics without WEIGHTS and TERMS (what a step returns)."""
    return {k: v for k, v in metrics.items() if k not in (WEIGHTS, TERMS)}


def share(weight):
    """This device's w / Σ_d w over the devices (0 where every weight is 0)."""
    total = jax.lax.psum(weight, AXES)
    return jnp.where(total > 0, weight / jnp.where(total > 0, total, 1.0), 0.0)


def weighted_mean(x, weight):
    """Σ_d w_d·x_d / Σ_d w_d over the devices; Σ_d x_d when weight is TOTAL."""
    if weight is TOTAL:
        return jax.lax.psum(x, AXES)
    return jax.lax.psum(x * share(weight), AXES)


def make_pmap_update_step(loss_fn: Callable, mesh, state_shardings, batch_shardings, update: Callable,
                          learning_rate: Callable) -> Callable:
    """Jitted `(state, batch) -> (state, metrics)` for a replicated state on a (data, 1, 1) mesh, the state
    donated. update(state, grads, loss) -> (state, metrics) is the optimizer update (steps.apply_update)."""

    def device_step(state, batch):
        # Dropout masks differ per device, as they do for different rows of one global batch.
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXES))

        def terms_of(params):
            with nn.logical_axis_rules(()):  # per-device code: no sharding constraints inside the model
                loss, metrics = loss_fn(params, batch, rng)
            weights, coefficients = metrics.get(WEIGHTS, {}), metrics.get(TERMS, {"loss": 1.0})
            values = {"loss": loss, **strip_declarations(metrics)}
            return {k: values[k] for k in coefficients}, (values, weights, coefficients)

        terms, vjp, (values, weights, coefficients) = jax.vjp(terms_of, state.params, has_aux=True)
        weight = lambda name: weights.get(name, weights.get("loss", 1.0))  # noqa: E731
        as_float = lambda w: w if w is TOTAL else jnp.asarray(w, jnp.float32)  # noqa: E731
        # d(global loss)/d(this device's term k) = coefficient_k · w_k / Σ_d w_k.
        cotangent = {k: coefficients[k] * share(as_float(weight(k))) for k in terms}
        grads = jax.lax.psum(vjp(cotangent)[0], AXES)
        means = {k: weighted_mean(v, as_float(weight(k))) for k, v in values.items() if k != "loss" or k in terms}
        loss = sum(coefficients[k] * means[k] for k in terms)
        new_state, update_metrics = update(state, grads, loss)
        return new_state, {**means, **update_metrics, "loss": loss, "lr": learning_rate(state.step)}

    batch_specs = jax.tree.map(lambda s: s.spec, batch_shardings)
    mapped = jax.shard_map(device_step, mesh=mesh, in_specs=(P(), batch_specs), out_specs=(P(), P()),
                           check_vma=False)
    jitted = jax.jit(mapped, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    return sharding.with_sharding_context(jitted, mesh, ())

