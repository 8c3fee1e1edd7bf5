"""The one attention function of the model.

`attend` serves every layer: dense causal now, sparse patterns (Child et al. 2019) by
`pattern`. q: [B, T, H, D]; k, v: [B, S, H, D]; returns [B, T, H, D].

Two calling modes:
- training (q_pos is None): causal self-attention over positions 0..T-1 (T == S);
- decoding / padded inputs: q_pos [B, T] and k_pos [B, S] are absolute position ids and
  k_valid [B, S] marks real (non-padding, already written) keys.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PATTERNS = ("dense",)


def layer_pattern(attention_cfg, layer: int) -> str:
    """The pattern of layer `layer`: `attention_cfg.layers` is a comma list cycled over layers."""
    names = [p.strip() for p in attention_cfg.layers.split(",")]
    return names[layer % len(names)]


def token_mask(pattern: str, q_pos, k_pos, attention_cfg=None):
    """Boolean [..., T, S]: may query at position q_pos attend key at k_pos."""
    q = q_pos[..., :, None]
    k = k_pos[..., None, :]
    causal = k <= q
    if pattern == "dense":
        return causal
    raise ValueError(f"unknown attention pattern {pattern!r}; known: {PATTERNS}")


def attend(q, k, v, *, pattern="dense", attention_cfg=None, q_pos=None, k_pos=None,
           k_valid=None, dropout_rate=0.0, dropout_rng=None, deterministic=True):
    T, S = q.shape[1], k.shape[1]
    if q_pos is None:
        q_pos = jnp.arange(T)[None]
        k_pos = jnp.arange(S)[None]
    mask = token_mask(pattern, q_pos, k_pos, attention_cfg)  # [B|1, T, S]
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    mask = mask[:, None]  # [B, 1, T, S] broadcast over heads
    scale = 1.0 / np.sqrt(q.shape[-1])
    logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if dropout_rate > 0.0 and not deterministic:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)
