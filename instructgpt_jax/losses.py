"""Losses: pure functions of arrays (no modules, no configs), each checkable against its paper equation."""
from __future__ import annotations

import functools

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


def prompt_target_mask(loss_mask):
    """The prompt targets of an SFT row: the positions before the first response target (loss_mask [B, T])."""
    return jnp.cumsum(loss_mask, axis=-1) == 0


def mean_weights(mask):
    """Weights w with Σ w·x = the mean of x over mask (masked_mean as a fixed weighting)."""
    mask = mask.astype(jnp.float32)
    return mask / jnp.maximum(mask.sum(), 1.0)


def sft_loss_terms(logits, targets, loss_mask) -> dict:
    """The pieces of the SFT loss: mean cross-entropy and token count of the response targets (loss_mask [B, T]:
    the response and its EOS) and of the prompt targets (the positions before the first response target)."""
    nll = -token_logprobs(logits, targets)  # once for both means
    prompt_mask = prompt_target_mask(loss_mask)
    return dict(response_loss=masked_mean(nll, loss_mask), response_tokens=loss_mask.astype(jnp.float32).sum(),
                prompt_loss=masked_mean(nll, prompt_mask), prompt_tokens=prompt_mask.astype(jnp.float32).sum())


def sft_loss(logits, targets, loss_mask, prompt_loss_weight=0.0):
    """Supervised fine-tuning loss: cross-entropy on response tokens (+ λ · LM loss on the prompt).

    λ = prompt_loss_weight is GPT-1's auxiliary LM weight (Radford et al. 2018, eq. 5: L3 = L2 + λ·L1);
    InstructGPT trains on the response only (λ = 0). Returns (loss, response loss, number of response tokens).
    """
    t = sft_loss_terms(logits, targets, loss_mask)
    return t["response_loss"] + prompt_loss_weight * t["prompt_loss"], t["response_loss"], t["response_tokens"]


# ------------------------------------------------------------------------------ chunked LM head


def chunked_lm_head_losses(hidden, embedding, targets, weights, vocab_size: int, chunk: int):
    """Weighted sums of next-token NLL through a tied LM head, `chunk` tokens at a time:

        losses[k] = Σ_t weights[k, t] · (−log softmax(hidden_t · embeddingᵀ)[targets_t])

    hidden [..., d] (the compute dtype), embedding [V_padded, d] (rows ≥ vocab_size excluded, as GPT.unembed
    does), targets [...] int, weights [K, ...] (fixed: they get no gradient). Returns float32 [K]. Equals the
    same sums of -token_logprobs(hidden · embeddingᵀ, targets), but only one [chunk, V_padded] block of logits
    exists at a time. Under differentiation the forward pass computes the gradients as it goes (6·N·V·d
    FLOPs in all, as the full-logits path; recomputing the logits in the backward pass would cost 8), which
    is why the weightings must be known up front: the backward pass only scales them. On a batch sharded
    over devices, GSPMD all-reduces the embedding gradient once per chunk (the scan carries it whole).
    """
    d = hidden.shape[-1]
    flat_weights = weights.reshape(weights.shape[0], -1).astype(jnp.float32).T  # [N, K]
    chunk = min(chunk, flat_weights.shape[0])  # more would only add padding
    return _lm_head_losses(hidden.reshape(-1, d), embedding, targets.reshape(-1), flat_weights, vocab_size, chunk)


def _to_chunks(x, chunk: int):
    """[N, ...] -> [N_chunks, chunk, ...], zero-padded; chunk c holds rows c, c + N_chunks, c + 2·N_chunks, ...
    Strided, not contiguous, so that rows sharded over devices (the batch) leave every chunk evenly sharded
    rather than each chunk on one device, which the scan would gather."""
    n_chunks = -(-x.shape[0] // chunk)
    x = jnp.pad(x, [(0, n_chunks * chunk - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    return jnp.swapaxes(x.reshape(chunk, n_chunks, *x.shape[1:]), 0, 1)


def _from_chunks(x, n: int):
    """Inverse of _to_chunks: [N_chunks, chunk, ...] -> [n, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])[:n]


def _chunk_logits(hidden, embedding, vocab_size: int):
    """float32 logits [C, V_padded] of hidden [C, d], padded vocabulary entries at -1e9 (as GPT.unembed)."""
    logits = jax.lax.dot_general(hidden, embedding, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if vocab_size < embedding.shape[0]:
        logits = jnp.where(jnp.arange(embedding.shape[0]) < vocab_size, logits, -1e9)
    return logits


def _log_normaliser_and_nll(logits, targets):
    """logsumexp [C] and −log softmax(logits)[targets] [C]."""
    peak = logits.max(axis=-1)
    log_z = peak + jnp.log(jnp.exp(logits - peak[:, None]).sum(axis=-1))
    return log_z, log_z - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


def _chunked_nll(hidden, embedding, targets, chunk: int, vocab_size: int):
    """Per-token NLL [N] (no gradients: evaluation)."""
    embedding = embedding.astype(hidden.dtype)

    def one_chunk(_, xs):
        h, t = xs
        return None, _log_normaliser_and_nll(_chunk_logits(h, embedding, vocab_size), t)[1]

    _, nll = jax.lax.scan(one_chunk, None, (_to_chunks(hidden, chunk), _to_chunks(targets, chunk)))
    return _from_chunks(nll, hidden.shape[0])


def _chunked_nll_and_gradients(hidden, embedding, targets, weights, chunk: int, vocab_size: int):
    """Per-token NLL [N], its gradient w.r.t. each token's hidden state [N, d] (float32, unweighted:
    (softmax − onehot)·W), and the gradient of each weighting's sum w.r.t. the embedding [V_padded, K, d]."""
    n, d = hidden.shape
    k = weights.shape[1]
    embedding = embedding.astype(hidden.dtype)

    def one_chunk(d_embedding, xs):
        h, t, w = xs
        logits = _chunk_logits(h, embedding, vocab_size)
        log_z, nll = _log_normaliser_and_nll(logits, t)
        d_logits = jnp.exp(logits - log_z[:, None]) - (jnp.arange(logits.shape[1]) == t[:, None])
        d_logits = d_logits.astype(h.dtype)  # matmuls in the compute dtype, as the full path's
        d_hidden = jnp.dot(d_logits, embedding, preferred_element_type=jnp.float32)
        # The weights scale the [C, K·d] operand, not the [C, V] one; contracting dim 0 of both operands
        # needs no transposed copy on XLA:CPU.
        weighted_h = (h[:, None, :] * w[:, :, None].astype(h.dtype)).reshape(-1, k * d)
        d_embedding += jax.lax.dot_general(d_logits, weighted_h, (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)
        return d_embedding, (nll, d_hidden)

    xs = tuple(_to_chunks(x, chunk) for x in (hidden, targets, weights))
    zeros = jnp.zeros((embedding.shape[0], k * d), jnp.float32)
    d_embedding, (nll, d_hidden) = jax.lax.scan(one_chunk, zeros, xs)
    return _from_chunks(nll, n), _from_chunks(d_hidden, n), d_embedding.reshape(-1, k, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lm_head_losses(hidden, embedding, targets, weights, vocab_size, chunk):
    return weights.T @ _chunked_nll(hidden, embedding, targets, chunk, vocab_size)


def _lm_head_losses_fwd(hidden, embedding, targets, weights, vocab_size, chunk):
    nll, d_hidden, d_embedding = _chunked_nll_and_gradients(hidden, embedding, targets, weights, chunk, vocab_size)
    # Residuals in the primals' dtypes (a residual cannot be a dtype): the cotangents must have them.
    return weights.T @ nll, (weights, d_hidden.astype(hidden.dtype), d_embedding.astype(embedding.dtype))


def _lm_head_losses_bwd(vocab_size, chunk, residuals, cotangent):
    weights, d_hidden, d_embedding = residuals
    d_hidden = ((weights @ cotangent)[:, None] * d_hidden).astype(d_hidden.dtype)
    d_embedding = jnp.einsum("vkd,k->vd", d_embedding, cotangent).astype(d_embedding.dtype)
    return d_hidden, d_embedding, None, None


_lm_head_losses.defvjp(_lm_head_losses_fwd, _lm_head_losses_bwd)


# ------------------------------------------------------------------------------ tied LM head, per token


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def tied_head_logprobs(hidden, embedding, targets, vocab_size: int, temperature: float = 1.0):
    """Per-token log p(targets) and entropy of softmax(hidden · embeddingᵀ / temperature): hidden [N, d] (the
    compute dtype), embedding [V_padded, d] (rows ≥ vocab_size excluded, as GPT.unembed), targets [N] int ->
    float32 ([N], [N]). The values of token_logprobs and entropy of the unembedded logits; PPO's policy terms.

    A custom VJP with the [N, V] log-probabilities as residual: autodiff through the unembedding transposes the
    [N, V] logit gradient into a copy before the embedding-gradient matmul on XLA:CPU (~10% of a tiny PPO
    update), while contracting dim 0 of both operands directly needs none."""
    return _tied_head_forward(hidden, embedding, targets, vocab_size, temperature)[0]


def _tied_head_forward(hidden, embedding, targets, vocab_size, temperature):
    logits = _chunk_logits(hidden, embedding.astype(hidden.dtype), vocab_size) / temperature
    log_p = jax.nn.log_softmax(logits, axis=-1)
    token = jnp.take_along_axis(log_p, targets[:, None], axis=-1)[:, 0]
    return (token, -(jnp.exp(log_p) * log_p).sum(axis=-1)), (hidden, embedding, targets, log_p)


def _tied_head_backward(vocab_size, temperature, residuals, cotangents):
    hidden, embedding, targets, log_p = residuals
    d_token, d_entropy = cotangents
    p = jnp.exp(log_p)
    entropy = -(p * log_p).sum(axis=-1, keepdims=True)
    target = jnp.arange(log_p.shape[1])[None] == targets[:, None]
    # ∂ log p_y / ∂z = onehot(y) − p;  ∂H / ∂z = −p · (log p + H)
    d_logits = (d_token[:, None] * (target - p) - d_entropy[:, None] * p * (log_p + entropy)) / temperature
    d_logits = d_logits.astype(hidden.dtype)  # matmuls in the compute dtype, as the forward's
    d_hidden = jnp.dot(d_logits, embedding.astype(hidden.dtype), preferred_element_type=jnp.float32)
    d_embedding = jax.lax.dot_general(d_logits, hidden, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return d_hidden.astype(hidden.dtype), d_embedding.astype(embedding.dtype), None


tied_head_logprobs.defvjp(_tied_head_forward, _tied_head_backward)


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


# ------------------------------------------------------------------------------ PPO (Schulman et al. 2017)


def masked_mean(x, mask, axis=None):
    mask = mask.astype(jnp.float32)
    return (x * mask).sum(axis=axis) / jnp.maximum(mask.sum(axis=axis), 1.0)


def masked_whiten(x, mask, shift_mean: bool = True):
    """(x − mean) / std over the masked entries; with shift_mean=False the mean is added back (Ziegler et
    al. 2019 whiten rewards without shifting them, so the sign of a reward survives)."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def kl_penalised_rewards(logprobs, ref_logprobs, scores, response_mask, kl_coef):
    """Per-token rewards of InstructGPT's objective (Ouyang et al. 2022, eq. 2):

        r_t = −β · (log π(y_t|·) − log π_SFT(y_t|·)),  plus the RM score r_θ(x, y) at the last token.

    logprobs, ref_logprobs, response_mask [B, N]; scores [B]. Returns (rewards [B, N], per-token KL [B, N]).
    """
    mask = response_mask.astype(jnp.float32)
    kl = (logprobs - ref_logprobs) * mask
    last = jnp.maximum(mask.sum(axis=-1).astype(jnp.int32) - 1, 0)
    at_last = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * mask
    return -kl_coef * kl + scores[:, None] * at_last, kl


def generalized_advantages(rewards, values, response_mask, gamma: float = 1.0, lam: float = 0.95):
    """GAE (Schulman et al. 2016, eq. 16) over response tokens; the episode ends after the last one.

        δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   returns R_t = A_t + V_t

    rewards, values, response_mask [B, N] (mask 1 up to and including EOS). Past the last token V = 0 and
    A = 0. Returns (advantages, returns), 0 where masked.
    """
    mask = response_mask.astype(jnp.float32)
    values = values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = (rewards + gamma * next_values - values) * mask

    def backward(carry, delta_and_mask):
        delta, m = delta_and_mask
        advantage = delta + gamma * lam * carry * m
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(deltas[:, 0]), (deltas.T, mask.T), reverse=True)
    advantages = advantages.T * mask
    return advantages, (advantages + values) * mask


def leave_one_out_advantages(rewards, response_mask, group: int):
    """RLOO's baseline (Kool et al. 2019; Ahmadian et al. 2024, eq. 5): each response's return Σ_t r_t minus
    the mean return of the other group − 1 responses to the same prompt, as the advantage of every one of its
    tokens. Rows g·k … g·k + k − 1 (k = group >= 2) share a prompt.

    rewards, response_mask [B, N]. Returns (advantages [B, N], returns [B])."""
    mask = response_mask.astype(jnp.float32)
    returns = (rewards * mask).sum(axis=-1)
    grouped = returns.reshape(-1, group)
    others = (grouped.sum(axis=1, keepdims=True) - grouped) / (group - 1)
    return (grouped - others).reshape(-1)[:, None] * mask, returns


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip: float = 0.2):
    """Clipped surrogate (Schulman et al. 2017, eq. 7), as a loss, averaged over response tokens.

    Returns (loss, metrics): clip fraction and approximate KL(π_old ‖ π) = mean ½(log ratio)² (Schulman's k2).
    """
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {"clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
               "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), mask)}
    return loss, metrics


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """Clipped value loss (as in OpenAI baselines' PPO2, used by Ziegler et al. 2019):
    ½·max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²), averaged over response tokens.
    Returns (loss, clip fraction)."""
    change = values - old_values
    clipped_values = old_values + jnp.clip(change, -clip, clip)
    unclipped_loss, clipped_loss = jnp.square(values - returns), jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped_loss, clipped_loss), mask)
    # V_old + (V − V_old) need not round back to V, so an unclipped token can have the larger "clipped" loss by an
    # ulp: count only tokens whose clip is active.
    clipped = (jnp.abs(change) > clip) & (clipped_loss > unclipped_loss)
    return loss, masked_mean(clipped.astype(jnp.float32), mask)


def explained_variance(predictions, targets, mask):
    """1 − Var[targets − predictions] / Var[targets] over masked entries (1 = perfect, ≤ 0 = useless)."""
    def var(x):
        return masked_mean(jnp.square(x - masked_mean(x, mask)), mask)
    return 1.0 - var(targets - predictions) / jnp.maximum(var(targets), 1e-8)


def adaptive_kl_coef(kl_coef, observed_kl, target: float, horizon: float, n_steps: int):
    """Ziegler et al. (2019, §2.2) proportional controller, in the form of their code (lm-human-preferences):
    β ← β·(1 + e·n/horizon), e = clip(KL/KL_target − 1, −0.2, 0.2), n = episodes since the last update."""
    error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)
