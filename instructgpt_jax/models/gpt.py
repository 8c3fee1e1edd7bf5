"""GPT-2/GPT-3 decoder (Radford et al. 2019 §2.3; Brown et al. 2020 §2.1) in flax.linen.

Token + learned position embeddings, pre-LayerNorm blocks of causal multi-head attention and
a GELU MLP, a final LayerNorm and an unembedding tied to the token embedding. Parameters are
float32 and annotated with logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`); the
compute dtype is configurable. Every layer's attention goes through `attention.attend`, which
also serves the sparse patterns. With `decode=True` the attention layers keep a KV cache in the
"cache" collection, keys and values heads-major [B, H, S, D]: call once with the (left-padded) prompt,
then one token at a time.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from instructgpt_jax.models import attention

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hashable model hyperparameters (flax module attributes must be hashable)."""

    vocab_size: int
    max_len: int
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_ff: int
    embd_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    dtype: str = "float32"
    remat: str = "none"  # none | full | dots
    vocab_pad_multiple: int = 128
    lm_head_chunk: int = 0  # > 0: losses run the tied LM head this many tokens at a time (losses.py)
    attention: Any = None  # frozen ml_collections ConfigDict of attention.default_config()

    @classmethod
    def from_config(cls, model_cfg) -> "GPTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in model_cfg.items() if k in fields}
        values["attention"] = model_cfg.attention.lock() if hasattr(model_cfg.attention, "lock") else model_cfg.attention
        return cls(**values)

    @property
    def padded_vocab(self) -> int:
        """Vocabulary rounded up so the unembedding shards evenly (e.g. GPT-2's 50257 -> 50304)."""
        m = self.vocab_pad_multiple
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


def normal(std):
    return nn.initializers.normal(stddev=std)


def residual_std(cfg: GPTConfig) -> float:
    """GPT-2 §2.3: residual projections scaled by 1/sqrt(N) at init, N = 2·n_layers residual layers."""
    return 0.02 / math.sqrt(2 * cfg.n_layers)


def _contract(x, w, n_in: int):
    """x [*batch, *in] · w [*in, *out] -> [*batch, *out]: x's last n_in axes against w's first n_in."""
    n_batch = x.ndim - n_in
    return jax.lax.dot_general(x, w, ((tuple(range(n_batch, x.ndim)), tuple(range(n_in))), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x, w, n_in: int):
    """x [*batch, *in] · w [*in, *out] -> [*batch, *out], contracting x's last n_in axes with w's first n_in.

    The value of the einsum; the custom VJP only orders the weight gradient's operands. XLA:CPU copies the left
    operand of a matmul that contracts the token axis into a transposed layout. Autodiff puts the cotangent
    there (transpose(dyᵀ·x)), so every weight gradient copied a [tokens, out] array, 4× the width of x for the
    MLP's fc. Here the narrower of x and dy goes on the left (xᵀ·dy, or (dyᵀ·x)ᵀ with a weight-sized transpose)."""
    return _contract(x, w, n_in)


def _project_fwd(x, w, n_in):
    return _contract(x, w, n_in), (x, w)


def _project_bwd(n_in, residuals, dy):
    x, w = residuals
    n_batch, n_out = x.ndim - n_in, w.ndim - n_in
    dx = jax.lax.dot_general(dy, w, ((tuple(range(n_batch, dy.ndim)), tuple(range(n_in, w.ndim))), ((), ())))
    batch = (tuple(range(n_batch)),) * 2
    if math.prod(x.shape[n_batch:]) <= math.prod(dy.shape[n_batch:]):
        dw = jax.lax.dot_general(x, dy, (batch, ((), ())))
    else:
        dw = jax.lax.dot_general(dy, x, (batch, ((), ())))
        dw = jnp.transpose(dw, tuple(range(n_out, w.ndim)) + tuple(range(n_out)))
    return dx.astype(x.dtype), dw.astype(w.dtype)


project.defvjp(_project_fwd, _project_bwd)


class Projection(nn.Module):
    """y = x · W + b contracting x's trailing axes with W's leading ones, W [*in, *out] with its full shape and
    logical names (DenseGeneral flattens W at init, which breaks logical sharding constraints on multi-axis
    kernels); b has W's output axes (`bias_names`), so len(kernel_shape) - len(bias_names) axes are contracted."""

    kernel_shape: tuple
    kernel_names: tuple
    bias_names: tuple
    std: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        n_in = len(self.kernel_shape) - len(self.bias_names)
        w = self.param("kernel", nn.with_logical_partitioning(normal(self.std), self.kernel_names), self.kernel_shape)
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_names),
                       self.kernel_shape[n_in:])
        return project(x.astype(self.dtype), w.astype(self.dtype), n_in) + b.astype(self.dtype)


class CausalSelfAttention(nn.Module):
    cfg: GPTConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, kv_valid, deterministic, decode):
        cfg = self.cfg
        qkv = Projection((cfg.d_model, 3, cfg.n_heads, cfg.d_head), ("embed", None, "heads", "kv"), (None, "heads", "kv"),
                         0.02, cfg.compute_dtype, name="qkv")(x)  # one fused matmul, as GPT-2's c_attn
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k, v = (nn.with_logical_constraint(t, ("batch", "length", "act_heads", "kv")) for t in (q, k, v))

        q_pos = k_pos = k_valid = None
        if decode:
            k, v, k_pos, k_valid = self._update_cache(k, v, positions, kv_valid)
            q_pos = positions
        elif positions is not None or kv_valid is not None:
            q_pos = k_pos = positions
            k_valid = kv_valid
        dropout_rng = None if deterministic or cfg.attn_dropout == 0.0 else self.make_rng("dropout")
        out = attention.attend(
            q, k, v,
            pattern=attention.layer_pattern(cfg.attention, self.layer), attention_cfg=cfg.attention,
            q_pos=q_pos, k_pos=k_pos, k_valid=k_valid,
            dropout_rate=cfg.attn_dropout, dropout_rng=dropout_rng, deterministic=deterministic,
            kv_heads_major=decode,
        )
        out = Projection((cfg.n_heads, cfg.d_head, cfg.d_model), ("heads", "kv", "embed"), ("embed",),
                         residual_std(cfg), cfg.compute_dtype, name="out")(out)
        return out

    def _update_cache(self, k, v, positions, kv_valid):
        """Writes this call's keys/values at the cache cursor; returns the whole cache, keys and values
        heads-major [B, H, S, D] (decode attention then contracts them without transposing the cache)."""
        B, T, H, D = k.shape
        S = self.cfg.max_len
        initialized = self.has_variable("cache", "key")
        zeros = lambda shape, dtype: (lambda: jnp.zeros(shape, dtype))  # noqa: E731
        ck = self.variable("cache", "key", zeros((B, H, S, D), k.dtype))
        cv = self.variable("cache", "value", zeros((B, H, S, D), v.dtype))
        cpos = self.variable("cache", "positions", zeros((B, S), jnp.int32))
        cvalid = self.variable("cache", "valid", zeros((B, S), jnp.bool_))
        cursor = self.variable("cache", "cursor", zeros((), jnp.int32))
        if kv_valid is None:
            kv_valid = jnp.ones((B, T), jnp.bool_)
        heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        if not initialized:  # model.init(decode=True) only creates the (empty) cache
            return heads_major(k), heads_major(v), positions, kv_valid
        i = cursor.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, heads_major(k), (0, 0, i, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, heads_major(v), (0, 0, i, 0))
        cpos.value = jax.lax.dynamic_update_slice(cpos.value, positions.astype(jnp.int32), (0, i))
        cvalid.value = jax.lax.dynamic_update_slice(cvalid.value, kv_valid, (0, i))
        cursor.value = i + T
        return ck.value, cv.value, cpos.value, cvalid.value


class MLP(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        h = Projection((cfg.d_model, cfg.d_ff), ("embed", "mlp"), ("mlp",), 0.02, cfg.compute_dtype, name="fc")(x)
        h = nn.with_logical_constraint(nn.gelu(h, approximate=True), ("batch", "length", "act_mlp"))
        return Projection((cfg.d_ff, cfg.d_model), ("mlp", "embed"), ("embed",), residual_std(cfg),
                          cfg.compute_dtype, name="proj")(h)


def layer_norm(cfg: GPTConfig, name: str):
    return nn.LayerNorm(epsilon=1e-5, dtype=cfg.compute_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class Block(nn.Module):
    cfg: GPTConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, kv_valid, deterministic, decode):
        cfg = self.cfg
        h = CausalSelfAttention(cfg, self.layer, name="attn")(layer_norm(cfg, "ln_1")(x), positions, kv_valid, deterministic, decode)
        x = x + nn.Dropout(cfg.resid_dropout)(h, deterministic=deterministic)
        h = MLP(cfg, name="mlp")(layer_norm(cfg, "ln_2")(x))
        x = x + nn.Dropout(cfg.resid_dropout)(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute elementwise ops
}


class GPT(nn.Module):
    """Returns logits [B, T, padded_vocab] (padded entries at -inf), or the final hidden states."""

    cfg: GPTConfig

    def setup(self):
        cfg = self.cfg
        self.wte = nn.Embed(cfg.padded_vocab, cfg.d_model, dtype=cfg.compute_dtype,
                            embedding_init=nn.with_logical_partitioning(normal(0.02), ("vocab", "embed")))
        self.wpe = nn.Embed(cfg.max_len, cfg.d_model, dtype=cfg.compute_dtype,
                            embedding_init=nn.with_logical_partitioning(normal(0.01), (None, "embed")))
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(4, 5))
        self.blocks = [block(cfg, i, name=f"h_{i}") for i in range(cfg.n_layers)]
        self.ln_f = layer_norm(cfg, "ln_f")
        self.drop = nn.Dropout(cfg.embd_dropout)

    def __call__(self, tokens, positions=None, kv_valid=None, *, deterministic=True, decode=False, return_hidden=False):
        """tokens [B, T]; positions [B, T] (default 0..T-1); kv_valid [B, T] marks non-padding tokens."""
        if decode and positions is None:
            raise ValueError("decode=True needs explicit positions")
        pos = positions if positions is not None else jnp.arange(tokens.shape[1])[None]
        x = self.wte(tokens) + self.wpe(pos)
        x = self.drop(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        for blk in self.blocks:
            x = blk(x, positions, kv_valid, deterministic, decode)
        x = self.ln_f(x)
        if return_hidden:
            return x
        return self.unembed(x)

    def unembed(self, x):
        """Tied unembedding (GPT-2): logits = h · W_teᵀ, in float32 for a stable softmax."""
        logits = self.wte.attend(x).astype(jnp.float32)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        if self.cfg.padded_vocab != self.cfg.vocab_size:
            real = jnp.arange(self.cfg.padded_vocab) < self.cfg.vocab_size
            logits = jnp.where(real, logits, -1e9)
        return logits


def tied_embedding(params):
    """The unembedding matrix [padded_vocab, d_model] of GPT params: the token embedding (GPT.unembed)."""
    return nn.meta.unbox(params["wte"]["embedding"])


def init_cache(model: GPT, batch_size: int):
    """An empty KV cache for `batch_size` sequences of up to cfg.max_len tokens (no parameters are built)."""
    ones = jnp.ones((batch_size, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ones, ones, decode=True))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def count_params(cfg: GPTConfig) -> int:
    """Parameter count from shapes alone (jax.eval_shape: nothing is allocated)."""
    model = GPT(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def matmul_params(cfg: GPTConfig) -> int:
    """N of PaLM's 6N FLOPs/token: weights that take part in matmuls (tied unembedding once, no position table)."""
    per_layer = 4 * cfg.d_model * cfg.n_heads * cfg.d_head + 2 * cfg.d_model * cfg.d_ff
    return cfg.n_layers * per_layer + cfg.padded_vocab * cfg.d_model


def train_flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """PaLM (Chowdhery et al. 2022, App. B): 6N + 12·L·d_attn·T FLOPs per token for forward+backward."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.d_head * seq_len
