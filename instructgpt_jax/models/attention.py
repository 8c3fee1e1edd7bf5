"""The one attention function of the model, with dense and sparse causal patterns.

`attend` serves every layer. q: [B, T, H, D]; k, v: [B, S, H, D]; returns [B, T, H, D]. Decoding reads
the KV cache heads-major, k, v: [B, H, S, D] (`kv_heads_major=True`), the layout its score and value
contractions take without a transpose of the whole cache at every step.

Two calling modes:
- training (q_pos, k_pos, k_valid all None): causal self-attention over positions 0..T-1 (T == S);
  sparse patterns take the block-sparse path here (FLOPs and memory scale with density);
- decoding / padded inputs: q_pos [B, T] and k_pos [B, S] are absolute position ids and
  k_valid [B, S] marks real (non-padding, already written) keys; the exact token mask of the
  pattern is built from the positions and applied to dense scores (T is 1 when decoding).

Patterns (all causal, j <= i; Child et al. 2019 "Generating Long Sequences with Sparse
Transformers", arXiv 1904.10509, §4.2; Brown et al. 2020, §2.1 for GPT-3's banded layers):
  dense                   j <= i
  local                   i - k < j <= i                          (k = local_window)
  strided_a1 / _a2        i - l <= j <= i  /  (i - j) mod l == 0   (l = stride)
  fixed_a1 / _a2          j // l == i // l  /  j mod l >= l - c    (c = fixed_c)
  strided_union, fixed_union              A1 | A2 in every head ("merged head", §4.3)
  strided_split_heads, fixed_split_heads  first half of the heads A1, second half A2
A row with no allowed key (fixed_a2 before the first summary position) outputs zeros.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instructgpt_jax.errors import ConfigError
from instructgpt_jax.models import block_sparse

KEY = "model.attention"
SCHEMES = {"gpt3_alternating": "dense,local"}  # GPT-3: alternating dense and locally banded layers
PATTERNS = ("dense", "local", "strided_a1", "strided_a2", "strided_union", "strided_split_heads",
            "fixed_a1", "fixed_a2", "fixed_union", "fixed_split_heads")
LAYER_NAMES = PATTERNS + ("strided", "fixed")  # "strided" / "fixed" are resolved by `combine`
COMBINES = ("interleave", "union", "split_heads")
IMPLEMENTATIONS = ("auto", "reference", "block_sparse", "splash", "cudnn")
MIN_CAUSAL_TILE = 64  # smaller tiles cost more in overhead than the skipped upper triangle saves (CPU)
BANDED = ("dense", "local", "strided_a1")  # a causal band: cuDNN's sliding window can run these


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.layers = "dense"  # comma list cycled over layers, or a name in SCHEMES
    c.local_window = 256  # k: band width of "local" (not given by Brown et al. 2020)
    c.stride = 128  # l: Child et al.'s enwik8 model uses the fixed pattern with stride 128 ...
    c.fixed_c = 32  # c: ... and c = 32 summary positions per block of l
    c.block_size = 128  # tile of the block-sparse and splash kernels; must divide the sequence
    c.combine = "union"  # how "strided"/"fixed" combine A1 and A2: interleave | union | split_heads
    c.implementation = "auto"  # auto | reference | block_sparse | splash | cudnn
    return c


@dataclasses.dataclass(frozen=True)
class PatternParams:
    """The hashable numbers a pattern depends on (so plans can be cached per shape)."""
    local_window: int
    stride: int
    fixed_c: int

    @classmethod
    def of(cls, attention_cfg) -> "PatternParams":
        cfg = attention_cfg if attention_cfg is not None else default_config()
        return cls(int(cfg.local_window), int(cfg.stride), int(cfg.fixed_c))


# ---------------------------------------------------------------- per-layer patterns

def layer_names(attention_cfg) -> list[str]:
    spec = SCHEMES.get(attention_cfg.layers.strip(), attention_cfg.layers)
    return [name.strip() for name in spec.split(",")]


def layer_pattern(attention_cfg, layer: int) -> str:
    """The resolved pattern of layer `layer`: the `layers` list cycled; "strided"/"fixed" become
    A1 and A2 on alternate occurrences (interleave), their union, or a split of the heads."""
    names = layer_names(attention_cfg)
    name = names[layer % len(names)]
    if name not in ("strided", "fixed"):
        return name
    if attention_cfg.combine == "union":
        return f"{name}_union"
    if attention_cfg.combine == "split_heads":
        return f"{name}_split_heads"
    earlier = (layer // len(names)) * names.count(name) + names[:layer % len(names)].count(name)
    return f"{name}_a1" if earlier % 2 == 0 else f"{name}_a2"


def head_groups(pattern: str) -> tuple[str, ...]:
    """Head-uniform patterns of consecutive equal groups of heads."""
    if pattern.endswith("_split_heads"):
        base = pattern[: -len("_split_heads")]
        return (f"{base}_a1", f"{base}_a2")
    return (pattern,)


def pattern_fn(pattern: str, params: PatternParams):
    """mask(i, j) for query position i and key position j (numpy or jax, broadcasting)."""
    k, l, c = params.local_window, params.stride, params.fixed_c
    parts = {
        "dense": lambda i, j: j <= i,
        "local": lambda i, j: (j <= i) & (j > i - k),
        "strided_a1": lambda i, j: (j <= i) & (j >= i - l),
        "strided_a2": lambda i, j: (j <= i) & ((i - j) % l == 0),
        "fixed_a1": lambda i, j: (j <= i) & (j // l == i // l),
        "fixed_a2": lambda i, j: (j <= i) & (j % l >= l - c),
    }
    if pattern in parts:
        return parts[pattern]
    if pattern in ("strided_union", "fixed_union"):
        a1, a2 = parts[pattern.replace("union", "a1")], parts[pattern.replace("union", "a2")]
        return lambda i, j: a1(i, j) | a2(i, j)
    raise ValueError(f"unknown head-uniform attention pattern {pattern!r}; known: {PATTERNS} "
                     "(split-head patterns go through head_groups)")


def token_mask(pattern: str, q_pos, k_pos, attention_cfg=None):
    """Boolean [..., T, S]: may the query at q_pos attend the key at k_pos (head-uniform pattern)."""
    return pattern_fn(pattern, PatternParams.of(attention_cfg))(q_pos[..., :, None], k_pos[..., None, :])


# ---------------------------------------------------------------- block-sparse layouts

def _residue_major(T: int, l: int) -> np.ndarray:
    """Tokens sorted by i mod l: strided A2 becomes causal inside each residue class."""
    return np.argsort(np.arange(T) % l, kind="stable")


def _summaries_first(T: int, l: int, c: int) -> np.ndarray:
    """Keys with j mod l >= l - c (fixed A2's summary positions) first, in order."""
    return np.argsort(np.arange(T) % l < l - c, kind="stable")


def components(pattern: str, params: PatternParams, T: int):
    """Disjoint (mask_fn, q_order, k_order) pieces whose union is `pattern`, each in the token
    order that makes it block-sparse."""
    natural = np.arange(T)
    fn = functools.partial(pattern_fn, params=params)
    strided_order = _residue_major(T, params.stride)
    fixed_keys = _summaries_first(T, params.stride, params.fixed_c)
    if pattern in ("dense", "local", "strided_a1", "fixed_a1"):
        return [(fn(pattern), natural, natural)]
    if pattern == "strided_a2":
        return [(fn(pattern), strided_order, strided_order)]
    if pattern == "fixed_a2":
        return [(fn(pattern), natural, fixed_keys)]
    if pattern in ("strided_union", "fixed_union"):
        a1, a2 = fn(pattern.replace("union", "a1")), fn(pattern.replace("union", "a2"))
        q2, k2 = (strided_order, strided_order) if pattern == "strided_union" else (natural, fixed_keys)
        return [(a1, natural, natural), (lambda i, j: a2(i, j) & ~a1(i, j), q2, k2)]
    raise ValueError(f"unknown head-uniform attention pattern {pattern!r}; known: {PATTERNS}")


@functools.lru_cache(maxsize=128)
def block_plans(pattern: str, params: PatternParams, T: int, block: int):
    """Static block layouts (numpy, computed once per shape) of a head-uniform pattern."""
    return tuple(block_sparse.plan_component(fn, q_order, k_order, block)
                 for fn, q_order, k_order in components(pattern, params, T))


# ---------------------------------------------------------------- implementations

def reference_attention(q, k, v, mask, dropout_rate=0.0, dropout_rng=None, deterministic=True,
                        kv_heads_major=False):
    """Masked dense attention, the oracle. mask: bool broadcastable to [B, H, T, S]; k, v: [B, S, H, D],
    or [B, H, S, D] with kv_heads_major."""
    kv = "bhsd" if kv_heads_major else "bshd"
    scale = 1.0 / np.sqrt(q.shape[-1])
    logits = jnp.einsum(f"bthd,{kv}->bhts", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask, logits, block_sparse.NEG), axis=-1)
    probs = jnp.where(mask, probs, 0.0)  # rows with no allowed key give 0, as block_sparse does
    if dropout_rate > 0.0 and not deterministic:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum(f"bhts,{kv}->bthd", probs.astype(v.dtype), v)


def xla_dense_attention(q, k, v):
    """Plain causal attention computing all T^2 scores (jax.nn.dot_product_attention, XLA)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def cudnn_kwargs(pattern: str, params: PatternParams) -> dict:
    """Arguments of jax.nn.dot_product_attention for a banded pattern: a causal sliding window
    whose left size counts the keys before i (the band i - w <= j <= i)."""
    left = {"dense": None, "local": params.local_window - 1, "strided_a1": params.stride}[pattern]
    return {"is_causal": True, "local_window_size": None if left is None else (left, 0)}


def cudnn_attention(q, k, v, pattern, params, backend="cudnn"):
    """Flash attention on GPU via cuDNN (bf16/fp16); backend="xla" runs the same call on CPU."""
    return jax.nn.dot_product_attention(q, k, v, implementation=backend, **cudnn_kwargs(pattern, params))


def splash_mask(pattern: str, params: PatternParams, T: int):
    """The per-head mask object handed to Splash attention: lazy for dense/local, numpy otherwise."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    if pattern == "dense":
        return splash.CausalMask((T, T))
    if pattern == "local":
        return splash.LocalMask((T, T), window_size=(params.local_window - 1, 0), offset=0)
    return splash.NumpyMask(np.asarray(token_mask(pattern, np.arange(T), np.arange(T), params)))


@functools.lru_cache(maxsize=32)
def _splash_kernel(pattern: str, params: PatternParams, T: int, heads: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash_mask(pattern, params, T)] * heads)
    with jax.ensure_compile_time_eval():  # the kernel holds concrete mask arrays, never tracers
        return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_block(T: int, block_size: int) -> int | None:
    """Splash tile: a multiple of 128 (the TPU lane width, required even when interpreted) that
    divides T, as close to block_size as possible; None if T has none."""
    block = max(128, block_size - block_size % 128)
    while block > 128 and T % block:
        block -= 128
    return block if T % block == 0 else None


def splash_attention(q, k, v, pattern, params, block_size):
    """Splash attention (Pallas TPU kernel; interpreted elsewhere) with the pattern as its mask."""
    B, T, H, D = q.shape
    block = splash_block(T, block_size)
    if block is None:
        raise ValueError(f"splash attention needs a sequence length divisible by 128, got {T}")
    kernel = _splash_kernel(pattern, params, T, H, block, jax.default_backend() != "tpu")
    to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, H, T, D]
    out = jax.vmap(kernel)(to_heads_first(q * (1.0 / np.sqrt(D))), to_heads_first(k), to_heads_first(v))
    has_key = np.asarray(token_mask(pattern, np.arange(T), np.arange(T), params)).any(-1)
    return jnp.where(has_key[None, :, None, None], to_heads_first(out), 0).astype(v.dtype)


def choose_implementation(requested: str, pattern: str, q, training: bool, dropout: bool,
                          block_size: int = 128) -> str:
    """"auto": splash on TPU, cuDNN on GPU for banded bf16/fp16 layers, block-sparse for sparse
    patterns elsewhere and for dense causal layers on CPU when the sequence is at least two tiles (the
    tiles above the diagonal are skipped), else plain XLA. Decoding and dropout use the reference."""
    if not training or dropout:
        return "reference"
    if requested != "auto":
        return requested
    backend = jax.default_backend()
    if backend == "tpu" and splash_block(q.shape[1], block_size) is not None:
        return "splash"
    cudnn_ok = q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128 and pattern in BANDED
    if backend in ("gpu", "cuda") and cudnn_ok:
        return "cudnn"
    if pattern != "dense":
        return "block_sparse"
    # Measured on the 2-core CPU (bench train, 8L-512, T=512, interleaved A/B in one process): utilisation
    # 0.67 with 128-token causal tiles, 0.61-0.66 with 64, 0.54 with 16, vs 0.59 computing all T^2 scores
    # with XLA; at tiny (T=128, tiles of 32) the two are even.
    tiles = q.shape[1] // block_size if q.shape[1] % block_size == 0 else 0
    return "block_sparse" if backend == "cpu" and tiles >= 2 and block_size >= MIN_CAUSAL_TILE else "xla"


def attend(q, k, v, *, pattern="dense", attention_cfg=None, q_pos=None, k_pos=None,
           k_valid=None, dropout_rate=0.0, dropout_rng=None, deterministic=True, kv_heads_major=False):
    """Causal attention of one layer under `pattern` (a name from layer_pattern); see the module
    docstring for the two calling modes. attention_cfg: default_config() shaped, None = defaults."""
    groups = head_groups(pattern)
    if len(groups) > 1:  # split heads: consecutive equal groups of heads, one pattern each
        split = lambda x, axis=2: jnp.split(x, len(groups), axis=axis)
        kv_axis = 1 if kv_heads_major else 2
        outs = [attend(qg, kg, vg, pattern=p, attention_cfg=attention_cfg, q_pos=q_pos, k_pos=k_pos,
                       k_valid=k_valid, dropout_rate=dropout_rate, deterministic=deterministic,
                       dropout_rng=None if dropout_rng is None else jax.random.fold_in(dropout_rng, g),
                       kv_heads_major=kv_heads_major)
                for g, (p, qg, kg, vg) in enumerate(zip(groups, split(q), split(k, kv_axis), split(v, kv_axis)))]
        return jnp.concatenate(outs, axis=2)
    cfg = attention_cfg if attention_cfg is not None else default_config()
    params = PatternParams.of(cfg)
    training = q_pos is None and k_pos is None and k_valid is None
    dropout = dropout_rate > 0.0 and not deterministic
    impl = choose_implementation(cfg.implementation, pattern, q, training, dropout, cfg.block_size)
    if kv_heads_major and impl != "reference":
        raise ValueError(f"kv_heads_major (the KV cache's layout) is read only by the reference implementation "
                         f"that decoding uses, not by {impl!r}")
    if impl == "reference":
        T, S = q.shape[1], k.shape[2 if kv_heads_major else 1]
        q_pos = jnp.arange(T)[None] if q_pos is None else q_pos
        k_pos = jnp.arange(S)[None] if k_pos is None else k_pos
        mask = token_mask(pattern, q_pos, k_pos, cfg)  # [B|1, T, S]
        if k_valid is not None:
            mask = mask & k_valid[:, None, :]
        return reference_attention(q, k, v, mask[:, None], dropout_rate, dropout_rng, deterministic,
                                   kv_heads_major)
    if impl == "xla":
        return xla_dense_attention(q, k, v)
    if impl == "block_sparse":
        return block_sparse.block_sparse_attention(block_plans(pattern, params, q.shape[1], cfg.block_size), q, k, v)
    if impl == "splash":
        return splash_attention(q, k, v, pattern, params, cfg.block_size)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, pattern, params)
    raise ValueError(f"unknown attention implementation {impl!r}; known: {IMPLEMENTATIONS}")


# ---------------------------------------------------------------- config validation

def validate(attention_cfg, seq_len: int, n_heads: int, dropout_rate: float = 0.0) -> None:
    """Raise ConfigError, naming the key, for settings no implementation can run."""
    cfg = attention_cfg
    names = layer_names(cfg)
    unknown = [n for n in names if n not in LAYER_NAMES]
    if unknown or not names:
        raise ConfigError(f"{KEY}.layers={cfg.layers!r}: unknown pattern(s) {unknown}; known: "
                          f"{LAYER_NAMES} or a scheme in {tuple(SCHEMES)}")
    for key in ("local_window", "stride", "fixed_c", "block_size"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{KEY}.{key}={cfg[key]} must be >= 1")
    if cfg.fixed_c > cfg.stride:
        raise ConfigError(f"{KEY}.fixed_c={cfg.fixed_c} must be <= {KEY}.stride={cfg.stride}")
    patterns = {layer_pattern(cfg, i) for i in range(2 * len(names))}
    blocked = any(g != "dense" for p in patterns for g in head_groups(p)) or cfg.implementation == "block_sparse"
    if blocked and seq_len % cfg.block_size:  # dense layers never tile the sequence into blocks
        raise ConfigError(f"{KEY}.block_size={cfg.block_size} must divide the sequence length {seq_len} "
                          f"(layers {cfg.layers!r})")
    if cfg.implementation == "splash" and splash_block(seq_len, cfg.block_size) is None:
        raise ConfigError(f"{KEY}.implementation='splash' needs a sequence length ({seq_len}) divisible "
                          f"by 128, its smallest tile ({KEY}.block_size={cfg.block_size})")
    if cfg.combine not in COMBINES:
        raise ConfigError(f"{KEY}.combine={cfg.combine!r} must be one of {COMBINES}")
    if cfg.implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"{KEY}.implementation={cfg.implementation!r} must be one of {IMPLEMENTATIONS}")
    if any(len(head_groups(p)) > 1 for p in patterns) and n_heads % 2:
        raise ConfigError(f"{KEY}.combine={cfg.combine!r} splits the heads in two halves: "
                          f"the number of heads ({n_heads}) must be even")
    if cfg.implementation == "cudnn":
        unbanded = sorted(g for p in patterns for g in head_groups(p) if g not in BANDED)
        if unbanded:
            raise ConfigError(f"{KEY}.implementation='cudnn' runs only the banded patterns {BANDED}; "
                              f"{KEY}.layers={cfg.layers!r} has {unbanded}")
    if dropout_rate > 0.0 and cfg.implementation not in ("auto", "reference"):
        raise ConfigError(f"{KEY}.implementation={cfg.implementation!r} has no attention dropout "
                          f"(rate {dropout_rate}); use 'reference' or 'auto' (which then uses it)")
