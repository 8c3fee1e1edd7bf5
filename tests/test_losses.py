"""Pure losses against brute-force loops on hand-made and random arrays."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import losses


def brute_force_ranking_loss(scores, num_responses):
    """InstructGPT eq. 1, one pair at a time: mean over prompts with K >= 2 of -1/C(K,2) Σ log σ(r_w - r_l)."""
    per_prompt = []
    for row, k in zip(scores, num_responses):
        if k < 2:
            continue
        total = sum(math.log(1 / (1 + math.exp(-(row[w] - row[l])))) for w, l in itertools.combinations(range(k), 2))
        per_prompt.append(-total / math.comb(k, 2))
    return float(np.mean(per_prompt)) if per_prompt else 0.0


def test_ranking_loss_equals_pair_loop_for_variable_k_with_padding():
    rng = np.random.default_rng(0)
    k_max = 9
    num_responses = np.array([2, 9, 4, 5, 1, 7, 3, 0])  # 1 and 0: padding rows, no pairs
    scores = rng.normal(size=(len(num_responses), k_max)) * 2
    scores[np.arange(k_max)[None] >= num_responses[:, None]] = 1e3  # padding must be ignored, however large
    got = float(losses.pairwise_ranking_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(num_responses)))
    assert got == pytest.approx(brute_force_ranking_loss(scores, num_responses), rel=1e-5)


def test_ranking_loss_weighs_each_prompt_equally_not_each_pair():
    # K=2 with margin 0 (loss log 2) and K=9 all perfectly separated (loss ~0): the mean is log(2)/2,
    # whereas averaging over all 1 + 36 pairs would give log(2)/37.
    scores = jnp.array([[0.0, 0.0] + [0.0] * 7, [1000.0 - 100 * i for i in range(9)]])
    loss = losses.pairwise_ranking_loss(scores, jnp.array([2, 9]))
    assert float(loss) == pytest.approx(math.log(2) / 2, rel=1e-5)


def test_ranking_loss_is_order_sensitive_and_its_gradient_separates_the_pair():
    n = jnp.array([2])
    right, wrong = jnp.array([[1.0, -1.0]]), jnp.array([[-1.0, 1.0]])
    assert float(losses.pairwise_ranking_loss(right, n)) < float(losses.pairwise_ranking_loss(wrong, n))
    grad = jax.grad(losses.pairwise_ranking_loss)(jnp.zeros((1, 2)), n)
    assert float(grad[0, 0]) < 0 < float(grad[0, 1])  # pushes the better response up, the worse down


def test_pairwise_accuracy_counts_strictly_ordered_pairs():
    scores = jnp.array([[3.0, 1.0, 2.0, 9.0], [1.0, 1.0, 0.0, 0.0]])
    # row 0 (K=3): pairs (0,1) right, (0,2) right, (1,2) wrong; row 1 (K=2): tie counts as wrong
    assert float(losses.pairwise_accuracy(scores, jnp.array([3, 2]))) == pytest.approx(2 / 4)


def response_example():
    """4 positions of prompt targets, 3 of response targets, 1 of padding."""
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 0, 0]], jnp.float32)
    return jax.random.normal(jax.random.PRNGKey(0), (1, 8, 11)), jnp.arange(8)[None] % 11, mask


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_sft_loss_gradient_reaches_prompt_logits_only_with_a_prompt_weight(weight):
    logits, targets, mask = response_example()
    grad = jax.grad(lambda lg: losses.sft_loss(lg, targets, mask, weight)[0])(logits)
    per_position = jnp.abs(grad).sum(-1)[0]
    assert bool(jnp.all(per_position[3:6] > 0)) and bool(jnp.all(per_position[6:] == 0))
    prompt = per_position[:3]
    assert bool(jnp.all(prompt == 0)) if weight == 0 else bool(jnp.all(prompt > 0))


def test_sft_loss_adds_lambda_times_the_prompt_loss():
    logits, targets, mask = response_example()
    nll = -jax.nn.log_softmax(logits)[0, jnp.arange(8), targets[0]]
    total, response, n = losses.sft_loss(logits, targets, mask, 0.25)
    assert float(n) == 3 and float(response) == pytest.approx(float(nll[3:6].mean()), rel=1e-6)
    assert float(total) == pytest.approx(float(nll[3:6].mean() + 0.25 * nll[:3].mean()), rel=1e-6)


def full_logits_sums(hidden, embedding, targets, weights, vocab_size):
    """The reference: Σ_t weights[k, t]·NLL through the whole [B, T, V] logits, padded entries at -1e9."""
    logits = jnp.einsum("btd,vd->btv", hidden, embedding.astype(hidden.dtype)).astype(jnp.float32)
    logits = jnp.where(jnp.arange(embedding.shape[0]) < vocab_size, logits, -1e9)
    return jnp.einsum("kbt,bt->k", weights, -losses.token_logprobs(logits, targets))


def lm_head_example(dtype=jnp.float32):
    """24 tokens, d=16, a vocabulary of 50 padded to 64, two weightings (a mean and a masked mean)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = jax.random.normal(keys[0], (2, 12, 16)).astype(dtype)
    embedding = 0.3 * jax.random.normal(keys[1], (64, 16))
    targets = jax.random.randint(keys[2], (2, 12), 0, 50)
    mask = jax.random.bernoulli(keys[3], 0.5, (2, 12))
    return hidden, embedding, targets, jnp.stack([losses.mean_weights(jnp.ones((2, 12))), losses.mean_weights(mask)])


@pytest.mark.parametrize("chunk", [5, 100])  # 5 leaves a padded last chunk; 100 > the 24 tokens
def test_chunked_lm_head_equals_full_logits_with_gradients(chunk):
    hidden, embedding, targets, weights = lm_head_example()
    cotangent = jnp.array([0.7, -1.3])  # any combination of the weightings, as pmap's TERMS take them

    def combined(loss_fn):
        return lambda h, w: loss_fn(h, w, targets, weights, 50) @ cotangent

    chunked = lambda h, w, t, wt, v: losses.chunked_lm_head_losses(h, w, t, wt, v, chunk)  # noqa: E731
    np.testing.assert_allclose(chunked(hidden, embedding, targets, weights, 50),  # the no-gradient path
                               full_logits_sums(hidden, embedding, targets, weights, 50), rtol=1e-5)
    value, grads = jax.value_and_grad(combined(chunked), (0, 1))(hidden, embedding)
    want_value, want_grads = jax.value_and_grad(combined(full_logits_sums), (0, 1))(hidden, embedding)
    assert float(value) == pytest.approx(float(want_value), rel=1e-5)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert float(jnp.abs(grads[1][50:]).max()) == 0.0  # padded vocabulary rows get no gradient


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tied_head_logprobs_and_entropy_equal_autodiff_through_the_logits(dtype):
    hidden, embedding, targets, _ = lm_head_example(dtype)
    hidden, targets, temperature = hidden.reshape(24, 16), targets.reshape(24), 0.7

    def reference(h, w):
        logits = jnp.where(jnp.arange(64) < 50, (h @ w.astype(h.dtype).T).astype(jnp.float32), -1e9) / temperature
        logp = jax.nn.log_softmax(logits)
        return losses.token_logprobs(logits, targets), -(jnp.exp(logp) * logp).sum(-1)

    d_token, d_entropy = jax.random.normal(jax.random.PRNGKey(1), (2, 24))  # PPO's ratio terms and the bonus
    combined = lambda fn: lambda h, w: fn(h, w)[0] @ d_token + fn(h, w)[1] @ d_entropy  # noqa: E731
    ours = lambda h, w: losses.tied_head_logprobs(h, w, targets, 50, temperature)  # noqa: E731
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for got, want in zip(ours(hidden, embedding), reference(hidden, embedding)):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    grads = jax.grad(combined(ours), (0, 1))(hidden, embedding)
    want_grads = jax.grad(combined(reference), (0, 1))(hidden, embedding)
    assert grads[0].dtype == dtype and grads[1].dtype == jnp.float32
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
    assert float(jnp.abs(grads[1][50:]).max()) == 0.0  # padded vocabulary rows get no gradient


def test_chunked_lm_head_gradients_keep_the_input_dtypes():
    hidden, embedding, targets, weights = lm_head_example(jnp.bfloat16)
    loss = lambda h, w: losses.chunked_lm_head_losses(h, w, targets, weights[:1], 50, 8)[0]  # noqa: E731
    d_hidden, d_embedding = jax.grad(loss, (0, 1))(hidden, embedding)
    assert d_hidden.dtype == jnp.bfloat16 and d_embedding.dtype == jnp.float32
    want = jax.grad(lambda h, w: full_logits_sums(h, w, targets, weights[:1], 50)[0], (0, 1))(hidden, embedding)
    np.testing.assert_allclose(d_embedding, want[1], atol=2e-3)
