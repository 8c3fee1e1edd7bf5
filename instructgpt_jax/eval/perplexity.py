"""Held-out language-modelling loss and perplexity, weighted by tokens (not by batches)."""
from __future__ import annotations

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp

from instructgpt_jax import losses


def sequence_nll(logits, targets, mask):
    """(summed negative log-likelihood, number of counted tokens) of targets [B, T] under logits [B, T, V]
    where mask [B, T] > 0."""
    mask = mask.astype(jnp.float32)
    return -(losses.token_logprobs(logits, targets) * mask).sum(), mask.sum()


def make_nll_fn(model):
    """Jitted (params, tokens [B, T+1], mask [B, T]) -> (nll sum, tokens): next-token prediction, no dropout.
    Run it under the stage's sharding context (sharding.with_sharding_context) for sharded params."""

    @jax.jit
    def nll(params, tokens, mask):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return sequence_nll(logits, tokens[:, 1:], mask)

    return nll


def heldout_perplexity(nll_fn, params, batches: Iterable[dict], max_batches: int | None = None) -> dict:
    """{"loss": nats per token, "perplexity": exp(loss), "tokens", "batches"} over batches of {"tokens" [B, T+1]}
    (every target counts) or SFT batches that also carry "loss_mask" [B, T] (response tokens count)."""
    total = count = 0.0
    n = 0
    for batch in batches:
        if max_batches is not None and n >= max_batches:
            break
        tokens = batch["tokens"]
        mask = batch.get("loss_mask")
        if mask is None:
            mask = jnp.ones((tokens.shape[0], tokens.shape[1] - 1), jnp.float32)
        nll, tokens_counted = jax.device_get(nll_fn(params, tokens, mask))
        total, count, n = total + float(nll), count + float(tokens_counted), n + 1
    if not count:
        raise ValueError("heldout_perplexity: the batches hold no counted tokens")
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": int(count), "batches": n}
