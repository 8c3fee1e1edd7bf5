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


def sft_loss(logits, targets, loss_mask, prompt_loss_weight=0.0):
    """Supervised fine-tuning loss: cross-entropy on response tokens (+ λ · LM loss on the prompt).

    loss_mask [B, T] marks the response targets (and the EOS); the prompt targets are the positions
    before the first response target. λ = prompt_loss_weight is GPT-1's auxiliary LM weight (Radford
    et al. 2018, eq. 5: L3 = L2 + λ·L1); InstructGPT trains on the response only (λ = 0).
    Returns (loss, response loss, number of response tokens).
    """
    response_loss, n_response = masked_lm_loss(logits, targets, loss_mask)
    if not prompt_loss_weight:
        return response_loss, response_loss, n_response
    prompt_mask = jnp.cumsum(loss_mask, axis=-1) == 0
    prompt_loss, _ = masked_lm_loss(logits, targets, prompt_mask)
    return response_loss + prompt_loss_weight * prompt_loss, response_loss, n_response


def _ordered_pairs(num_responses, k_max):
    """[B, K, K] mask of pairs (i, j), i < j < num_responses: response i was ranked above response j."""
    index = jnp.arange(k_max)
    above = index[:, None] < index[None, :]
    valid = index[None, :] < num_responses[:, None]
    return above[None] & valid[:, :, None] & valid[:, None, :]


def pairwise_ranking_loss(scores, num_responses):
    """InstructGPT reward-model loss (Ouyang et al. 2022, eq. 1), per prompt then averaged over prompts:

        loss(x) = -1/C(K,2) · Σ_{i<j<K} log σ(r(x, y_i) - r(x, y_j))

    scores [B, K_max] in rank order (best first), padded past num_responses [B] (the valid K of each
    prompt). Prompts with fewer than 2 responses (batch padding) carry no weight.
    """
    scores = scores.astype(jnp.float32)
    pairs = _ordered_pairs(num_responses, scores.shape[1]).astype(jnp.float32)
    margins = scores[:, :, None] - scores[:, None, :]
    n_pairs = pairs.sum(axis=(1, 2))
    per_prompt = -(jax.nn.log_sigmoid(margins) * pairs).sum(axis=(1, 2)) / jnp.maximum(n_pairs, 1.0)
    has_pairs = (n_pairs > 0).astype(jnp.float32)
    return (per_prompt * has_pairs).sum() / jnp.maximum(has_pairs.sum(), 1.0)


def pairwise_accuracy(scores, num_responses):
    """Fraction of all ranked pairs (over the batch) whose better response scores strictly higher."""
    pairs = _ordered_pairs(num_responses, scores.shape[1])
    correct = (scores[:, :, None] > scores[:, None, :]) & pairs
    return correct.sum() / jnp.maximum(pairs.sum(), 1)
