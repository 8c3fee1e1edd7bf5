"""Train state and the optax optimizer built from `config.optim`."""
from __future__ import annotations

from typing import Any

import flax.struct
from flax.core import meta
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes. `rng` is a base key; step s uses fold_in(rng, s), so resume is exact."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None


def learning_rate_schedule(optim_cfg) -> optax.Schedule:
    """Linear warmup to lr, cosine decay to final_lr_ratio·lr at decay_steps, constant after (GPT-3 App. B)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if optim_cfg.warmup_steps else optim_cfg.lr,
        peak_value=optim_cfg.lr,
        warmup_steps=optim_cfg.warmup_steps,
        decay_steps=max(optim_cfg.decay_steps, optim_cfg.warmup_steps + 1),
        end_value=optim_cfg.lr * optim_cfg.final_lr_ratio,
    )


# Params under a key of this name are frozen: the model stops their gradient and the optimizer leaves them
# exactly as loaded, with no state (a reward model's copy of the SFT policy, models/heads.py).
FROZEN_KEY = "frozen_reference"


def is_frozen(path) -> bool:
    return any(getattr(k, "key", None) == FROZEN_KEY for k in path)


def trained_or_frozen(params):
    """optax.multi_transform labels: "frozen" for params under FROZEN_KEY, "trained" for the rest. A logically
    partitioned param (at init) gets one label for its whole box, so that the optimizer state holds a bare
    optax.MaskedNode for a frozen one, which has nothing to shard, rather than a box around it."""
    is_box = lambda x: isinstance(x, meta.AxisMetadata)  # noqa: E731
    return jax.tree_util.tree_map_with_path(lambda path, _: "frozen" if is_frozen(path) else "trained", params,
                                            is_leaf=is_box)


def decay_mask(params):
    """Weight decay on matrices only (not biases, LayerNorm gains)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; gradient accumulation via optax.MultiSteps. Frozen params take
    set_to_zero instead: a zero-gradient AdamW would leave them unchanged too, but would hold two moments of
    each (a sft_loglik reward model's SFT copy would cost twice its size in optimizer state)."""
    adamw = optax.chain(
        optax.clip_by_global_norm(optim_cfg.grad_clip) if optim_cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(
            learning_rate=learning_rate_schedule(optim_cfg),
            b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay, mask=decay_mask,
        ),
    )
    tx = optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, trained_or_frozen)
    if optim_cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=optim_cfg.grad_accum_steps)
    return tx


def create_state(params, tx: optax.GradientTransformation, rng, ema: bool = False) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=rng,
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
    )
