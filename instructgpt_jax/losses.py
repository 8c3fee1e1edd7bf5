"""Losses: pure functions of arrays (no modules, no configs), each checkable against its paper equation."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits, targets):
    """log p(targets) under logits [..., V] -> [...] (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def masked_lm_loss(logits, targets, mask):
    """Mean next-token cross-entropy over positions where mask > 0.

    logits [B, T, V], targets [B, T] int, mask [B, T] (1 = counts). Returns (loss, number of tokens).
    """
    mask = mask.astype(jnp.float32)
    nll = -token_logprobs(logits, targets)
    n = jnp.maximum(mask.sum(), 1.0)
    return (nll * mask).sum() / n, mask.sum()


def lm_loss(logits, targets):
    """Mean next-token cross-entropy over every position (packed pretraining sequences)."""
    return -token_logprobs(logits, targets).mean()
