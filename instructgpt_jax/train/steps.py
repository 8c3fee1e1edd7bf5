"""Step factories: each builds a jitted pure function `(state, batch) -> (state, metrics)` from config.

A stage contributes only its loss, `loss_fn(params, batch, rng) -> (loss, metrics)`; the update
(gradients, clipping, AdamW, skipping non-finite updates, EMA) is shared by all of them. The
step's randomness (dropout) is `fold_in(state.rng, state.step)`, so a resumed run repeats it.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from instructgpt_jax import losses
from instructgpt_jax.models import gpt
from instructgpt_jax.train import sharding
from instructgpt_jax.train.state import TrainState, create_state, learning_rate_schedule, make_optimizer

LossFn = Callable[..., tuple[jax.Array, dict]]


def build_model(config) -> gpt.GPT:
    return gpt.GPT(gpt.GPTConfig.from_config(config.model))


def init_state_fn(model: gpt.GPT, tx: optax.GradientTransformation, seq_len: int, ema: bool = False):
    """Returns rng -> TrainState with nn.Partitioned (logically named) leaves, for sharding.sharded_init."""

    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init({"params": params_rng}, tokens)["params"]
        return create_state(params, tx, state_rng, ema=ema)

    return init


def apply_update(state: TrainState, grads, tx: optax.GradientTransformation, ema_decay: float | None = None):
    """One optimizer update; a non-finite gradient leaves params and optimizer state unchanged."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    params, opt_state = keep_old(params, state.params), keep_old(opt_state, state.opt_state)
    ema = state.ema_params
    if ema is not None and ema_decay is not None:
        ema = optax.incremental_update(params, ema, step_size=1.0 - ema_decay)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new_state, {"grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}


def make_update_step(loss_fn: LossFn, config, mesh, state_shardings, batch_shardings, ema_decay=None):
    """Jitted `(state, batch) -> (state, metrics)` with declared shardings and the state donated."""
    tx = make_optimizer(config.optim)
    schedule = learning_rate_schedule(config.optim)

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        new_state, update_metrics = apply_update(state, grads, tx, ema_decay)
        return new_state, {**metrics, **update_metrics, "loss": loss, "lr": schedule(state.step)}

    jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    return sharding.with_sharding_context(jitted, mesh, sharding.rules(config))


def make_eval_step(loss_fn: LossFn, config, mesh, params_shardings, batch_shardings):
    """Jitted `(params, batch) -> metrics`, deterministic (no dropout)."""

    def evaluate(params, batch):
        loss, metrics = loss_fn(params, batch, None)
        return {**metrics, "loss": loss}

    jitted = jax.jit(evaluate, in_shardings=(params_shardings, batch_shardings), out_shardings=sharding.replicated(mesh))
    return sharding.with_sharding_context(jitted, mesh, sharding.rules(config))


def pretrain_loss(model: gpt.GPT) -> LossFn:
    """Next-token cross-entropy on packed sequences: batch["tokens"] [B, T+1]."""

    def loss_fn(params, batch, rng):
        tokens = batch["tokens"]
        deterministic = rng is None
        logits = model.apply({"params": params}, tokens[:, :-1], deterministic=deterministic,
                             rngs=None if deterministic else {"dropout": rng})
        loss = losses.lm_loss(logits, tokens[:, 1:])
        return loss, {}

    return loss_fn


def make_pretrain_step(config, model, mesh, state_shardings):
    return make_update_step(pretrain_loss(model), config, mesh, state_shardings, sharding.batch_sharding(mesh))


def make_pretrain_eval_step(config, model, mesh, params_shardings):
    return make_eval_step(pretrain_loss(model), config, mesh, params_shardings, sharding.batch_sharding(mesh))
