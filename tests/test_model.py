"""GPT decoder: causality, the GPT-3 size table, parameter annotations, KV cache."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import configs, losses
from instructgpt_jax.models import gpt


def tiny_cfg(**overrides):
    c = configs.model_config("test")
    c.update(overrides)
    return gpt.GPTConfig.from_config(c)


@pytest.fixture(scope="module")
def model_and_params():
    cfg = tiny_cfg()
    model = gpt.GPT(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return model, params


def test_changing_a_future_token_never_changes_earlier_logits(model_and_params):
    model, params = model_and_params
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 4, 500)
    base = model.apply({"params": params}, tokens)
    for t in (0, 7, 20, 31):
        changed = tokens.at[:, t].set((tokens[:, t] + 17) % 500)
        out = model.apply({"params": params}, changed)
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
        assert not np.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("size", list(configs.GPT3_SIZES))
def test_gpt3_table_parameter_counts_within_two_percent(size):
    c = configs.model_config(size)
    n = gpt.count_params(gpt.GPTConfig.from_config(c))
    assert abs(n / c.nominal_params - 1) < 0.02, (size, n)


def test_gpt3_rows_follow_the_table():
    # Brown et al. 2020 Table 2.1 (with the documented XL and 13B resolutions).
    assert configs.batch_and_lr("small") == (256, 6e-4)
    assert configs.batch_and_lr("175b") == (1536, 0.6e-4)
    c = configs.model_config("175b")
    assert (c.n_layers, c.d_model, c.n_heads, c.d_head, c.max_len) == (96, 12288, 96, 128, 2048)


def test_every_parameter_has_logical_axis_names():
    cfg = tiny_cfg()
    boxed = jax.eval_shape(lambda: gpt.GPT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    names = {n for x in leaves for n in x.names if n}
    assert {"vocab", "embed", "heads", "kv", "mlp"} <= names


def test_unembedding_is_tied_and_padded_vocab_is_masked(model_and_params):
    model, params = model_and_params
    assert "lm_head" not in params and params["wte"]["embedding"].shape == (512, 64)
    cfg = tiny_cfg(vocab_size=500)
    p = nn.meta.unbox(gpt.GPT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    logits = gpt.GPT(cfg).apply({"params": p}, jnp.ones((1, 4), jnp.int32))
    assert logits.shape[-1] == 512 and bool((logits[..., 500:] < -1e8).all())


def test_chunked_lm_head_equals_the_unembedding_and_lm_loss():
    model = gpt.GPT(tiny_cfg(vocab_size=500))  # padded to 512
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, 500)
    hidden = model.apply({"params": params}, tokens[:, :-1], return_hidden=True)
    targets, embedding = tokens[:, 1:], gpt.tied_embedding(params)

    def full(h, w):
        logits = model.apply({"params": {**params, "wte": {"embedding": w}}}, h, method="unembed")
        return losses.lm_loss(logits, targets)

    def chunked(h, w):  # 32 tokens in chunks of 7: the last one padded
        return losses.chunked_lm_head_losses(h, w, targets, losses.mean_weights(jnp.ones((1, 2, 16))), 500, 7)[0]

    (value, grads), (want, want_grads) = (jax.value_and_grad(f, (0, 1))(hidden, embedding) for f in (chunked, full))
    assert float(value) == pytest.approx(float(want), rel=1e-5)
    for got, expected in zip(grads, want_grads):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_residual_projections_are_scaled_at_init(model_and_params):
    _, params = model_and_params
    std_out = float(params["h_0"]["attn"]["out"]["kernel"].std())
    std_qkv = float(params["h_0"]["attn"]["qkv"]["kernel"].std())
    assert std_qkv == pytest.approx(0.02, rel=0.1)
    assert std_out == pytest.approx(0.02 / np.sqrt(2 * 2), rel=0.1)


def test_kv_cache_decoding_matches_the_full_forward_pass(model_and_params):
    model, params = model_and_params
    B, T, P = 2, 12, 5
    tokens = jax.random.randint(jax.random.PRNGKey(2), (B, T), 4, 500)
    full = model.apply({"params": params}, tokens)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    cache = gpt.init_cache(model, B)
    out, mut = model.apply({"params": params, "cache": cache}, tokens[:, :P], positions[:, :P], decode=True, mutable=["cache"])
    np.testing.assert_allclose(out, full[:, :P], atol=1e-5)
    for t in range(P, T):
        out, mut = model.apply({"params": params, **mut}, tokens[:, t:t + 1], positions[:, t:t + 1], decode=True,
                               mutable=["cache"])
        np.testing.assert_allclose(out[:, 0], full[:, t], atol=1e-5)


def test_left_padding_with_position_ids_gives_the_unpadded_logits(model_and_params):
    model, params = model_and_params
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 6), 4, 500)
    ref = model.apply({"params": params}, tokens)
    pad = 3
    padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), tokens], axis=1)
    valid = jnp.arange(pad + 6)[None] >= pad
    positions = jnp.maximum(jnp.arange(pad + 6)[None] - pad, 0)
    out = model.apply({"params": params}, padded, positions, valid)
    np.testing.assert_allclose(out[:, pad:], ref, atol=1e-5)


def test_bf16_compute_keeps_float32_params():
    cfg = tiny_cfg(dtype="bfloat16")
    variables = gpt.GPT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(variables)))
    logits = gpt.GPT(cfg).apply(nn.meta.unbox(variables), jnp.ones((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits[..., :10]).all())


def test_flops_per_token_follows_palm():
    cfg = tiny_cfg()
    n = 2 * (4 * 64 * 64 + 2 * 64 * 256) + 512 * 64
    assert gpt.matmul_params(cfg) == n
    assert gpt.train_flops_per_token(cfg, 64) == 6 * n + 12 * 2 * 64 * 64


@pytest.mark.parametrize("x_shape, w_shape", [
    ((2, 5, 8), (8, 3, 2, 4)),    # qkv: x narrower than the output (xᵀ·dy)
    ((2, 5, 2, 4), (2, 4, 8)),    # attention out: equal widths
    ((2, 5, 16), (16, 4)),        # MLP proj: the output narrower ((dyᵀ·x)ᵀ)
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_projection_value_and_gradients_equal_autodiff_of_the_contraction(x_shape, w_shape, dtype):
    n_in = len(x_shape) - 2
    kx, kw, kd = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, x_shape, dtype)
    w = jax.random.normal(kw, w_shape, dtype)
    dy = jax.random.normal(kd, x_shape[:2] + w_shape[n_in:], dtype)
    y, vjp = jax.vjp(lambda a, b: gpt.project(a, b, n_in), x, w)
    want_y, want_vjp = jax.vjp(lambda a, b: gpt._contract(a, b, n_in), x, w)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(y), np.float32(want_y), rtol=tol, atol=tol)
    for got, want in zip(vjp(dy), want_vjp(dy)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_keep_the_loss_and_gradients(remat):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 64)

    def loss_and_grads(cfg):
        model = gpt.GPT(cfg)
        params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens[:, :-1])["params"])
        loss = lambda p: losses.lm_loss(model.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])
        return jax.jit(jax.value_and_grad(loss))(params)

    (value, grads), (want, want_grads) = loss_and_grads(tiny_cfg(remat=remat)), loss_and_grads(tiny_cfg())
    assert float(value) == pytest.approx(float(want), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, want_grads)
