"""Attention patterns and implementations against the masked-dense reference (tiny shapes, f32)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax.errors import ConfigError
from instructgpt_jax.models import attention, block_sparse

UNIFORM = ("dense", "local", "strided_a1", "strided_a2", "strided_union",
           "fixed_a1", "fixed_a2", "fixed_union")


def small_cfg(implementation="block_sparse", **overrides):
    cfg = attention.default_config()
    cfg.local_window, cfg.stride, cfg.fixed_c, cfg.block_size = 5, 8, 3, 8
    cfg.implementation = implementation
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def attend(q, k, v, **kwargs):
    """attention.attend under jit (eager op-by-op dispatch is slow on CPU)."""
    arrays = {name: kwargs.pop(name) for name in ("q_pos", "k_pos", "k_valid") if name in kwargs}
    return jax.jit(lambda q, k, v, arrays: attention.attend(q, k, v, **arrays, **kwargs))(q, k, v, arrays)


def qkv(B, T, H, D, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return [jax.random.normal(key, (B, T, H, D), jnp.float32) for key in keys]


def out_and_grads(cfg, pattern, q, k, v, cotangent):
    fn = lambda q, k, v: attention.attend(q, k, v, pattern=pattern, attention_cfg=cfg)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)
    return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def assert_matches_reference(cfg, pattern, shape, seed=0):
    q, k, v, cotangent = qkv(*shape, seed=seed)
    reference = cfg.copy_and_resolve_references()
    reference.implementation = "reference"
    out, grads = out_and_grads(cfg, pattern, q, k, v, cotangent)
    ref_out, ref_grads = out_and_grads(reference, pattern, q, k, v, cotangent)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the set definitions

def expected_allowed(pattern, i, j, k, l, c):
    """Child et al. 2019 §4.2 and Brown et al. 2020 §2.1, written out as sets of key positions."""
    local = set(range(i - k + 1, i + 1))
    strided_a1 = set(range(max(0, i - l), i + 1))
    strided_a2 = {jj for jj in range(0, i + 1) if (i - jj) % l == 0}
    fixed_a1 = {jj for jj in range(0, i + 1) if jj // l == i // l}
    fixed_a2 = {jj for jj in range(0, i + 1) if jj % l in range(l - c, l)}
    sets = {"dense": set(range(i + 1)), "local": local, "strided_a1": strided_a1,
            "strided_a2": strided_a2, "strided_union": strided_a1 | strided_a2,
            "fixed_a1": fixed_a1, "fixed_a2": fixed_a2, "fixed_union": fixed_a1 | fixed_a2}
    return j in sets[pattern]


@pytest.mark.parametrize("pattern", UNIFORM)
def test_token_mask_equals_set_definition(pattern):
    T, k, l, c = 23, 3, 4, 2
    cfg = small_cfg(local_window=k, stride=l, fixed_c=c)
    mask = np.asarray(attention.token_mask(pattern, np.arange(T), np.arange(T), cfg))
    for i in range(T):
        for j in range(T):
            assert mask[i, j] == expected_allowed(pattern, i, j, k, l, c), (pattern, i, j)


# ---------------------------------------------------------------- block-sparse vs reference

@pytest.mark.parametrize("pattern", attention.PATTERNS)
def test_block_sparse_matches_reference(pattern):
    assert_matches_reference(small_cfg(), pattern, (2, 64, 4, 8))


@pytest.mark.parametrize("seed", range(4))
def test_block_sparse_matches_reference_random_shapes(seed):
    rng = np.random.default_rng(seed)
    block = int(rng.choice([4, 8, 16]))
    T = block * int(rng.integers(2, 7))
    stride = int(rng.integers(2, 12))
    cfg = small_cfg(block_size=block, local_window=int(rng.integers(1, 20)), stride=stride,
                    fixed_c=int(rng.integers(1, stride + 1)))
    shape = (int(rng.integers(1, 3)), T, 2 * int(rng.integers(1, 3)), int(rng.choice([4, 8])))
    for pattern in rng.choice(attention.PATTERNS, size=3, replace=False):
        assert_matches_reference(cfg, str(pattern), shape, seed=seed)


@pytest.mark.parametrize("pattern", attention.PATTERNS)
def test_causal_future_keys_never_change_earlier_outputs(pattern):
    cfg = small_cfg()
    q, k, v, noise = qkv(1, 32, 2, 8)
    t0 = 13
    future = (jnp.arange(32) > t0)[None, :, None, None]
    out = attend(q, k, v, pattern=pattern, attention_cfg=cfg)
    changed = attend(q, jnp.where(future, noise, k), jnp.where(future, -noise, v),
                               pattern=pattern, attention_cfg=cfg)
    np.testing.assert_array_equal(out[:, :t0 + 1], changed[:, :t0 + 1])
    assert not np.allclose(out[:, t0 + 1:], changed[:, t0 + 1:])


def test_split_heads_gives_a1_to_first_half_and_a2_to_second():
    cfg = small_cfg()
    q, k, v, _ = qkv(1, 32, 4, 8)
    out = attend(q, k, v, pattern="strided_split_heads", attention_cfg=cfg)
    a1 = attend(q[:, :, :2], k[:, :, :2], v[:, :, :2], pattern="strided_a1", attention_cfg=cfg)
    a2 = attend(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], pattern="strided_a2", attention_cfg=cfg)
    np.testing.assert_allclose(out, jnp.concatenate([a1, a2], axis=2), atol=1e-6)


def test_rows_without_allowed_keys_output_zero():
    cfg = small_cfg()  # fixed_a2 with l=8, c=3: positions 0..4 see no summary position yet
    q, k, v, _ = qkv(1, 16, 2, 4)
    out = attend(q, k, v, pattern="fixed_a2", attention_cfg=cfg)
    np.testing.assert_array_equal(out[:, :5], 0.0)
    assert np.all(np.abs(out[:, 5:]).sum(-1) > 0)


# ---------------------------------------------------------------- FLOPs and memory scale with density

def test_block_layouts_scale_with_density():
    params, block = attention.PatternParams(local_window=64, stride=64, fixed_c=8), 32
    for T in (512, 2048):
        local, = attention.block_plans("local", params, T, block)
        assert local.slots == (T // block) * 3  # the band 64 wide touches 3 blocks of 32: linear in T
        strided = attention.block_plans("strided_union", params, T, block)
        dense_blocks = (T // block) * (T // block + 1) // 2
        assert sum(p.active_blocks for p in strided) < 0.5 * dense_blocks * (1024 / T)
    causal, = attention.block_plans("dense", params, 1024, block)
    assert len(causal.buckets) > 1 and causal.slots < 1.2 * causal.active_blocks  # bucketed triangle


def test_contiguous_layouts_read_keys_as_slices_and_equal_the_gathered_path():
    params, T, block = attention.PatternParams(local_window=20, stride=8, fixed_c=3), 64, 16
    dense, = attention.block_plans("dense", params, T, block)
    local, = attention.block_plans("local", params, T, block)
    np.testing.assert_array_equal(dense.key_ranges, [[0, 1], [0, 2], [0, 3], [0, 4]])  # causal prefixes
    np.testing.assert_array_equal(local.key_ranges, [[0, 1], [0, 2], [0, 3], [1, 4]])  # a 20-token band
    assert all(plan.key_ranges is None for plan in attention.block_plans("strided_a2", params, T, block))
    q, k, v, cotangent = qkv(2, T, 2, 8)
    for plan in (dense, local):
        gathered = dataclasses.replace(plan, key_ranges=None)
        results = [jax.jit(jax.value_and_grad(
            lambda q, k, v, p=p: jnp.sum(block_sparse.block_sparse_attention((p,), q, k, v) * cotangent), (0, 1, 2)))(
            q, k, v) for p in (plan, gathered)]
        (value, grads), (want_value, want_grads) = results
        np.testing.assert_allclose(value, want_value, rtol=1e-5)
        for grad, want in zip(grads, want_grads):
            np.testing.assert_allclose(grad, want, atol=1e-5)



@pytest.mark.parametrize("pattern", ("dense", "local"))
def test_flash_kernel_in_any_chunking_equals_the_reference(pattern):
    """The scan over chunks of heads (1, 2 or all 4 per step) gives the reference's output and gradients."""
    params, T, block = attention.PatternParams(local_window=20, stride=8, fixed_c=3), 64, 16
    plan, = attention.block_plans(pattern, params, T, block)
    q, k, v, cotangent = (x.reshape(4, T, 8) for x in qkv(2, T, 2, 8, seed=3))
    mask = attention.token_mask(pattern, np.arange(T), np.arange(T), small_cfg(local_window=20))
    def reference(q, k, v):
        return attention.reference_attention(q[:, :, None], k[:, :, None], v[:, :, None], mask[None, None])[:, :, 0]
    want, want_grads = jax.value_and_grad(lambda *x: jnp.sum(reference(*x) * cotangent), (0, 1, 2))(q, k, v)
    for heads in (1, 2, 4):
        loss = lambda q, k, v, h=heads: jnp.sum(block_sparse.flash_attention(plan, h, q / np.sqrt(8), k, v) * cotangent)
        value, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
        np.testing.assert_allclose(value, want, rtol=1e-5)
        for grad, want_grad in zip(grads, want_grads):
            np.testing.assert_allclose(grad, want_grad, atol=1e-5)


def test_heads_per_chunk_divides_the_heads_and_fits_the_budget():
    assert block_sparse.heads_per_chunk(64, 512, 64, 4) == 2  # 4 x 2 x 512 x 64 x 4 bytes = 1 MiB
    assert block_sparse.heads_per_chunk(64, 512, 64, 2) == 4
    assert block_sparse.heads_per_chunk(6, 512, 64, 4) == 2
    assert block_sparse.heads_per_chunk(7, 512, 64, 4) == 1
    assert block_sparse.heads_per_chunk(4, 8192, 128, 4) == 1  # nothing fits: one head per step

def test_residue_major_order_makes_strided_a2_block_diagonal():
    params = attention.PatternParams(local_window=1, stride=16, fixed_c=1)
    plan, = attention.block_plans("strided_a2", params, 256, 16)
    assert plan.active_blocks == 256 // 16  # natural order would need all 136 causal blocks
    natural = block_sparse.block_activity(attention.pattern_fn("strided_a2", params),
                                          np.arange(256), np.arange(256), 16)
    assert natural.sum() == 16 * 17 // 2


# ---------------------------------------------------------------- per-layer choice

def test_layer_pattern_cycles_the_comma_list():
    cfg = small_cfg(layers="dense, local,fixed_a1")
    assert [attention.layer_pattern(cfg, i) for i in range(7)] == [
        "dense", "local", "fixed_a1", "dense", "local", "fixed_a1", "dense"]


def test_gpt3_alternating_scheme():
    cfg = small_cfg(layers="gpt3_alternating")
    assert [attention.layer_pattern(cfg, i) for i in range(4)] == ["dense", "local", "dense", "local"]


def test_combine_resolves_strided_and_fixed():
    names = lambda cfg, n: [attention.layer_pattern(cfg, i) for i in range(n)]
    assert names(small_cfg(layers="strided", combine="interleave"), 4) == [
        "strided_a1", "strided_a2", "strided_a1", "strided_a2"]
    assert names(small_cfg(layers="dense,fixed", combine="interleave"), 6) == [
        "dense", "fixed_a1", "dense", "fixed_a2", "dense", "fixed_a1"]
    assert names(small_cfg(layers="strided", combine="union"), 2) == ["strided_union"] * 2
    assert names(small_cfg(layers="fixed", combine="split_heads"), 1) == ["fixed_split_heads"]


# ---------------------------------------------------------------- decoding with positions

@pytest.mark.parametrize("kv_heads_major", (False, True))
@pytest.mark.parametrize("pattern", ("local", "strided_union", "fixed_split_heads"))
def test_decode_path_equals_training_rows(pattern, kv_heads_major):
    cfg = small_cfg()
    B, T, H, D = 2, 24, 2, 8
    q, k, v, garbage = qkv(B, T, H, D)
    full = attend(q, k, v, pattern=pattern, attention_cfg=cfg)
    steps = jnp.array([9, 17])  # each sequence decodes its own position; later cache slots hold garbage
    written = jnp.arange(T)[None] <= steps[:, None]
    cache_k = jnp.where(written[..., None, None], k, garbage)
    cache_v = jnp.where(written[..., None, None], v, -garbage)
    if kv_heads_major:  # the KV cache's own layout [B, H, S, D]
        cache_k, cache_v = jnp.swapaxes(cache_k, 1, 2), jnp.swapaxes(cache_v, 1, 2)
    q_now = jnp.take_along_axis(q, steps[:, None, None, None], axis=1)
    out = attend(q_now, cache_k, cache_v, pattern=pattern, attention_cfg=cfg,
                 q_pos=steps[:, None], k_pos=jnp.broadcast_to(jnp.arange(T), (B, T)),
                 k_valid=written, kv_heads_major=kv_heads_major)
    expected = jnp.take_along_axis(full, steps[:, None, None, None], axis=1)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_heads_major_keys_are_refused_by_the_training_implementations():
    q, k, v, _ = qkv(1, 32, 2, 8)
    with pytest.raises(ValueError, match="kv_heads_major"):
        attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), pattern="local", attention_cfg=small_cfg(),
               kv_heads_major=True)


# ---------------------------------------------------------------- implementations and their choice

def test_auto_on_cpu_uses_causal_tiles_for_dense_when_they_fit_and_block_sparse_for_sparse():
    q = jnp.zeros((1, 256, 2, 8))
    choose = attention.choose_implementation
    assert choose("auto", "dense", q, training=True, dropout=False, block_size=128) == "block_sparse"
    assert choose("auto", "dense", q, training=True, dropout=False, block_size=256) == "xla"  # one tile: nothing to skip
    assert choose("auto", "dense", q, training=True, dropout=False, block_size=96) == "xla"  # T not a multiple
    assert choose("auto", "dense", q, training=True, dropout=False, block_size=16) == "xla"  # tiles too small to pay
    assert choose("auto", "local", q, training=True, dropout=False) == "block_sparse"
    assert choose("auto", "local", q, training=False, dropout=False) == "reference"
    assert choose("block_sparse", "local", q, training=True, dropout=True) == "reference"


@pytest.mark.parametrize("pattern", ("dense", "local"))
def test_auto_matches_reference(pattern):
    assert_matches_reference(small_cfg("auto"), pattern, (1, 32, 2, 8))


@pytest.mark.parametrize("pattern", attention.BANDED)
def test_cudnn_window_arguments_give_the_pattern(pattern):
    """The exact jax.nn.dot_product_attention call made on GPU, run by XLA on CPU."""
    cfg = small_cfg()
    q, k, v, _ = qkv(1, 32, 2, 8)
    params = attention.PatternParams.of(cfg)
    out = attention.cudnn_attention(q, k, v, pattern, params, backend="xla")
    mask = attention.token_mask(pattern, jnp.arange(32), jnp.arange(32), cfg)
    np.testing.assert_allclose(out, attention.reference_attention(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("pattern", ("local", "fixed_union", "strided_a2"))
def test_splash_mask_equals_token_mask(pattern):
    cfg = small_cfg()
    params = attention.PatternParams.of(cfg)
    mask = attention.splash_mask(pattern, params, 64)
    expected = np.asarray(attention.token_mask(pattern, np.arange(64), np.arange(64), cfg))
    np.testing.assert_array_equal(mask[:, :], expected)


@pytest.mark.parametrize("pattern", ("local", "fixed_a2"))
def test_splash_interpreted_on_cpu_matches_reference(pattern):
    assert_matches_reference(small_cfg("splash", block_size=128), pattern, (1, 256, 2, 8))


def test_dropout_runs_on_the_reference_path():
    cfg = small_cfg("auto")
    q, k, v, _ = qkv(1, 16, 2, 8)
    run = lambda deterministic: attend(
        q, k, v, pattern="local", attention_cfg=cfg, dropout_rate=0.5,
        dropout_rng=jax.random.PRNGKey(1), deterministic=deterministic)
    assert not np.allclose(run(False), run(True))
    np.testing.assert_allclose(run(True), attend(q, k, v, pattern="local", attention_cfg=cfg),
                               atol=1e-6)


# ---------------------------------------------------------------- validate

@pytest.mark.parametrize("overrides, seq_len, n_heads, dropout, key", [
    ({"layers": "dense,butterfly"}, 64, 4, 0.0, "model.attention.layers"),
    ({"block_size": 48, "layers": "strided"}, 64, 4, 0.0, "model.attention.block_size"),
    ({"local_window": 0}, 64, 4, 0.0, "model.attention.local_window"),
    ({"stride": 0}, 64, 4, 0.0, "model.attention.stride"),
    ({"fixed_c": 9}, 64, 4, 0.0, "model.attention.fixed_c"),
    ({"combine": "zip"}, 64, 4, 0.0, "model.attention.combine"),
    ({"layers": "strided", "combine": "split_heads"}, 64, 3, 0.0, "model.attention.combine"),
    ({"implementation": "flash"}, 64, 4, 0.0, "model.attention.implementation"),
    ({"implementation": "cudnn", "layers": "dense,fixed"}, 64, 4, 0.0, "model.attention.implementation"),
    ({"implementation": "splash", "block_size": 16}, 64, 4, 0.0, "model.attention.implementation"),
    ({"implementation": "block_sparse"}, 64, 4, 0.1, "model.attention.implementation"),
])
def test_validate_names_the_key(overrides, seq_len, n_heads, dropout, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        attention.validate(small_cfg(**overrides), seq_len, n_heads, dropout_rate=dropout)


def test_validate_accepts_good_configs():
    attention.validate(attention.default_config(), 2048, 12)
    attention.validate(small_cfg(layers="gpt3_alternating", implementation="cudnn"), 64, 4)
    attention.validate(small_cfg(layers="strided,fixed", combine="split_heads", implementation="auto"),
                       64, 4, dropout_rate=0.1)


@pytest.mark.parametrize("pattern", ("fixed_union", "dense"))  # the merged components; the flash kernel
def test_block_sparse_on_sharded_batch_and_heads(pattern):
    """Batch over a 'data' mesh axis and heads over 'tensor', as the model shards activations."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    sharding = NamedSharding(Mesh(devices, ("data", "tensor")), PartitionSpec("data", None, "tensor", None))
    cfg = small_cfg()
    q, k, v, cotangent = qkv(4, 32, 4, 8)
    loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, pattern=pattern, attention_cfg=cfg) * cotangent)
    run = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    (value, grads), (want, want_grads) = run(*(jax.device_put(x, sharding) for x in (q, k, v))), run(q, k, v)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for grad, want_grad in zip(grads, want_grads):
        np.testing.assert_allclose(grad, want_grad, atol=1e-5)


def test_block_sparse_in_bfloat16_is_close_to_the_f32_reference():
    cfg = small_cfg()
    q, k, v, _ = qkv(1, 32, 2, 8)
    low = attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), pattern="strided_union", attention_cfg=cfg)
    reference = small_cfg("reference")
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(jnp.float32),
                               attend(q, k, v, pattern="strided_union", attention_cfg=reference), atol=3e-2)


def test_dense_layers_accept_any_block_size():
    attention.validate(small_cfg("auto", block_size=32), 40, 4)  # dense never tiles T into blocks
    with pytest.raises(ConfigError, match="block_size=32 must divide the sequence length 40"):
        attention.validate(small_cfg("auto", block_size=32, layers="gpt3_alternating"), 40, 4)
