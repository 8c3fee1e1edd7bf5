"""Train state and the optax optimizer built from `config.optim`."""
from __future__ import annotations

from typing import Any

import flax.struct
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


# Params under a key of this name are frozen: the model stops their gradient and they get no weight decay,
# so AdamW leaves them exactly as loaded (a reward model's copy of the SFT policy, models/heads.py).
FROZEN_KEY = "frozen_reference"


def decay_mask(params):
    """Weight decay on matrices only (not biases, LayerNorm gains), and never on frozen params."""
    def decays(path, p):
        return p.ndim >= 2 and not any(getattr(k, "key", None) == FROZEN_KEY for k in path)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; gradient accumulation via optax.MultiSteps."""
    tx = optax.chain(
        optax.clip_by_global_norm(optim_cfg.grad_clip) if optim_cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(
            learning_rate=learning_rate_schedule(optim_cfg),
            b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay, mask=decay_mask,
        ),
    )
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
