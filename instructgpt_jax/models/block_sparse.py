"""Block-sparse attention in plain JAX (CPU/GPU/TPU): compute only the key blocks a query block needs.

A sparse pattern arrives as one or more disjoint *components*. A component is a token mask
function `mask_fn(i, j)` of absolute query/key positions plus a static token order for queries
and for keys. Reordering tokens is what makes a pattern block-sparse at all: Sparse Transformer's
strided A2 (Child et al. 2019, §4.2, keys i, i-l, i-2l, ...) touches every key block in the natural
order, but becomes block-diagonal once tokens are sorted by i mod l.

For each component, numpy derives a static plan at trace time:
  1. block activity: which (query block, key block) pairs contain at least one allowed token pair;
  2. buckets: query blocks sorted by how many key blocks they need and cut into a few buckets;
     a bucket is a [rows, slots] grid, one row per query block, as wide as its longest key list
     (shorter lists padded with valid=False). Banded layouts give one bucket; triangular ones
     (dense causal, the reordered A2 parts) a few, so padding stays ~1/(2 x buckets).
The computation gathers the K/V blocks of every slot, computes scores only for those (one
[b, D] x [D, slots*b] product per row), applies the exact token mask inside each block, and
returns the unnormalised softmax pieces (numerator, denominator, row max) so that components
merge exactly. FLOPs and memory are proportional to the number of slots, i.e. to the block density.

When a component keeps the natural token order and every query block needs one contiguous run of key
blocks (dense causal: a prefix; a local band: a window), each query block instead reads its keys as a
static slice: no gathered copies of K/V, and a backward pass without scatter-adds. On the 2-core CPU this
took fwd+bwd of dense causal attention alone (B=8, H=8, T=512, D=64) from 409 ms (gathered 128-token
slots) to 212-254 ms (64- and 128-token slices); inside the whole 8-layer training step the two paths
measured the same (4.7-4.8 s, interleaved in one process).

A pattern that is a single such component (dense causal, a local band) runs as a flash kernel instead
(`flash_attention`): a custom VJP that keeps only the output and the row log-sum-exp and recomputes the
scores in the backward pass, scanning over chunks of heads small enough that each chunk's scores stay in
cache (CPU). Patterns of several components (unions) merge the softmax pieces above.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e30  # finite "minus infinity" for masked scores
MAX_FLOOR = 0.5 * NEG  # row max never below this: exp(NEG - max) == 0 even in a row with no allowed key


@dataclasses.dataclass(frozen=True, eq=False)
class Bucket:
    """Query blocks served by one [rows, slots] grid."""
    row_blocks: np.ndarray  # [R] query block (in the component's q_order) of each row
    k_block: np.ndarray  # [R, M] key block (in k_order) gathered into each slot
    valid: np.ndarray  # [R, M] False for padding slots


@dataclasses.dataclass(frozen=True, eq=False)
class ComponentPlan:
    """The static block layout of one component (all arrays numpy, computed once per shape)."""
    mask_fn: Callable  # (i, j) -> bool, broadcasting, works on numpy and jax arrays
    q_order: np.ndarray  # [T] position of the query at index p of the component's order
    k_order: np.ndarray  # [T] likewise for keys
    block: int
    buckets: tuple[Bucket, ...]
    active_blocks: int  # (query block, key block) pairs with at least one allowed token pair
    key_ranges: np.ndarray | None = None  # [T/block, 2] (first, last + 1) key block per query block, when sliceable

    @property
    def slots(self) -> int:
        return sum(bucket.k_block.size for bucket in self.buckets)


def is_identity(order: np.ndarray) -> bool:
    return bool(np.array_equal(order, np.arange(len(order))))


def block_activity(mask_fn, q_order, k_order, block: int) -> np.ndarray:
    """Bool [T/block, T/block]: does query block a hold any query allowed to see a key in key block b."""
    n_q, n_k = len(q_order) // block, len(k_order) // block
    activity = np.zeros((n_q, n_k), bool)
    rows_per_chunk = max(1, (1 << 22) // (block * len(k_order)))  # bounds the temporary to ~4M entries
    for start in range(0, n_q, rows_per_chunk):
        stop = min(n_q, start + rows_per_chunk)
        i = q_order[start * block:stop * block, None]
        allowed = mask_fn(i, k_order[None, :]).reshape(stop - start, block, n_k, block)
        activity[start:stop] = allowed.any(axis=(1, 3))
    return activity


def _bucket_sizes(sorted_counts: np.ndarray, max_buckets: int, bucket_cost: float) -> list[int]:
    """Cut ascending counts into <= max_buckets runs minimising sum(len(run) * max(run)) plus
    bucket_cost per run (dynamic programming over cut points)."""
    n = len(sorted_counts)
    width = np.maximum(sorted_counts, 1)
    best = np.full((max_buckets + 1, n + 1), np.inf)
    cut = np.zeros((max_buckets + 1, n + 1), int)
    best[0, 0] = 0.0
    for k in range(1, max_buckets + 1):
        for end in range(1, n + 1):
            starts = np.arange(end)  # the run is sorted_counts[start:end]; its widest entry is the last
            costs = best[k - 1, :end] + (end - starts) * width[end - 1] + bucket_cost
            cut[k, end] = int(np.argmin(costs))
            best[k, end] = costs[cut[k, end]]
    k, end, sizes = int(np.argmin(best[:, n])), n, []
    while end > 0:
        sizes.append(end - cut[k, end])
        end, k = cut[k, end], k - 1
    return sizes[::-1]


def pack_buckets(activity: np.ndarray, max_buckets: int = 8) -> tuple[Bucket, ...]:
    """Buckets of query blocks with similar key-block counts; see the module docstring."""
    n_q = activity.shape[0]
    key_lists = [np.flatnonzero(row) for row in activity]
    counts = np.array([len(keys) for keys in key_lists])
    by_count = np.argsort(counts, kind="stable")
    buckets, start = [], 0
    for size in _bucket_sizes(counts[by_count], max_buckets, bucket_cost=max(1.0, n_q / 4)):
        rows = np.sort(by_count[start:start + size])
        start += size
        width = max(1, int(counts[rows].max()))
        k_block, valid = np.zeros((size, width), np.int32), np.zeros((size, width), bool)
        for r, qb in enumerate(rows):
            k_block[r, :counts[qb]] = key_lists[qb]
            valid[r, :counts[qb]] = True
        buckets.append(Bucket(rows.astype(np.int32), k_block, valid))
    return tuple(buckets)


def contiguous_key_ranges(activity: np.ndarray) -> np.ndarray | None:
    """[n_q, 2] (first, last + 1) active key block of each query block, or None unless every query block
    has at least one active key block and they form one contiguous run."""
    ranges = np.zeros((activity.shape[0], 2), np.int64)
    for row, active in enumerate(activity):
        keys = np.flatnonzero(active)
        if keys.size == 0 or keys[-1] - keys[0] + 1 != keys.size:
            return None
        ranges[row] = keys[0], keys[-1] + 1
    return ranges


def plan_component(mask_fn, q_order, k_order, block: int) -> ComponentPlan:
    q_order, k_order = np.asarray(q_order), np.asarray(k_order)
    activity = block_activity(mask_fn, q_order, k_order, block)
    natural = is_identity(q_order) and is_identity(k_order)
    return ComponentPlan(mask_fn, q_order, k_order, block, pack_buckets(activity), int(activity.sum()),
                         key_ranges=contiguous_key_ranges(activity) if natural else None)


def _reorder(x, order: np.ndarray):
    """x[:, order] along the token axis of [N, T, D]; free when the order is natural."""
    return x if is_identity(order) else x[:, order]


def _slot_mask(plan: ComponentPlan, bucket: Bucket):
    """Exact token mask of every row and slot, [R, b, M*b] (query, key): the pattern in the blocks."""
    b = plan.block
    q_pos = jnp.asarray(plan.q_order.reshape(-1, b)[bucket.row_blocks])  # [R, b]
    k_pos = jnp.asarray(plan.k_order.reshape(-1, b)[bucket.k_block].reshape(len(bucket.row_blocks), -1))
    valid = jnp.asarray(np.repeat(bucket.valid, b, axis=1))  # [R, M*b]
    return plan.mask_fn(q_pos[:, :, None], k_pos[:, None, :]) & valid[:, None, :]


def _bucket_attention(plan: ComponentPlan, bucket: Bucket, q_blocks, k_blocks, v_blocks):
    """Softmax pieces of one bucket's rows: one [b, D] x [D, M*b] product per row.
    q/k/v_blocks [N, T/b, b, D] (N = batch*heads). Matmuls keep a single batch dimension
    (N*R): XLA:CPU runs dots with several batch dimensions at about half the speed."""
    N, _, b, D = q_blocks.shape
    R, M = bucket.k_block.shape
    all_rows_in_order = R == q_blocks.shape[1] and is_identity(bucket.row_blocks)
    rows_q = q_blocks if all_rows_in_order else q_blocks[:, bucket.row_blocks]
    k_slots = k_blocks[:, bucket.k_block].reshape(N * R, M * b, D)
    v_slots = v_blocks[:, bucket.k_block].reshape(N * R, M * b, D)
    s = jnp.einsum("nqd,nkd->nqk", rows_q.reshape(N * R, b, D), k_slots,
                   preferred_element_type=jnp.float32).reshape(N, R, b, M * b)
    p, denom, m = _unnormalised_softmax(s, _slot_mask(plan, bucket))
    num = jnp.einsum("nqk,nkd->nqd", p.astype(v_slots.dtype).reshape(N * R, b, M * b), v_slots,
                     preferred_element_type=jnp.float32)
    return num.reshape(N, R * b, D), denom.reshape(N, R * b), m.reshape(N, R * b)


def _unnormalised_softmax(scores, mask):
    """exp(scores − row max) with masked entries exactly 0, its row sums and the (gradient-free) row max.
    mask None: every entry allowed."""
    s = scores if mask is None else jnp.where(mask, scores, NEG)
    m = jax.lax.stop_gradient(jnp.maximum(s.max(axis=-1), MAX_FLOOR))  # softmax ignores the shift
    p = jnp.exp(s - m[..., None])  # masked entries: exp(NEG - m) == 0 exactly
    return p, p.sum(axis=-1), m


def _sliced_attention(plan: ComponentPlan, q, k, v):
    """Softmax pieces in natural order when each query block's keys are one contiguous run of blocks
    (plan.key_ranges): a [b, D] x [D, run] product per query block on static slices of k and v."""
    b = plan.block
    pieces = []
    for row, (first, stop) in enumerate(plan.key_ranges):
        rows, keys = slice(row * b, (row + 1) * b), slice(first * b, stop * b)
        mask = plan.mask_fn(np.arange(rows.start, rows.stop)[:, None], np.arange(keys.start, keys.stop)[None, :])
        s = jnp.einsum("nqd,nkd->nqk", q[:, rows], k[:, keys], preferred_element_type=jnp.float32)
        p, denom, m = _unnormalised_softmax(s, mask)
        num = jnp.einsum("nqk,nkd->nqd", p.astype(v.dtype), v[:, keys], preferred_element_type=jnp.float32)
        pieces.append((num, denom, m))
    return tuple(jnp.concatenate(parts, axis=1) for parts in zip(*pieces))


def _natural_token_index(plan: ComponentPlan) -> np.ndarray:
    """[T] index into the buckets' concatenated row outputs of natural token t."""
    b = plan.block
    rows = np.concatenate([bucket.row_blocks for bucket in plan.buckets])
    flat_of_block = np.empty(len(rows), np.int64)
    flat_of_block[rows] = np.arange(len(rows)) * b
    flat_of_index = (flat_of_block[:, None] + np.arange(b)[None]).reshape(-1)
    natural_index = np.empty_like(flat_of_index)
    natural_index[plan.q_order] = flat_of_index  # token q_order[p] sits at component index p
    return natural_index


def component_attention(plan: ComponentPlan, q, k, v):
    """q (already scaled), k, v: [N, T, D] in natural order (N = batch*heads). Returns this
    component's softmax pieces in natural order: numerator [N, T, D] (f32), denominator [N, T],
    row max [N, T]."""
    if plan.key_ranges is not None:
        return _sliced_attention(plan, q, k, v)
    N, T, D = q.shape
    blocks = lambda x, order: _reorder(x, order).reshape(N, T // plan.block, plan.block, D)
    q_blocks, k_blocks, v_blocks = blocks(q, plan.q_order), blocks(k, plan.k_order), blocks(v, plan.k_order)
    pieces = [_bucket_attention(plan, bucket, q_blocks, k_blocks, v_blocks) for bucket in plan.buckets]
    num, denom, m = (jnp.concatenate(parts, axis=1) for parts in zip(*pieces))
    index = _natural_token_index(plan)
    if not is_identity(index):
        num, denom, m = num[:, index], denom[:, index], m[:, index]
    return num, denom, m


def merge_components(pieces):
    """Exact softmax over the union of disjoint components from their (num, denom, max) pieces."""
    if len(pieces) == 1:
        num, denom, _ = pieces[0]
        return num / jnp.where(denom > 0, denom, 1.0)[..., None]
    m = pieces[0][2]
    for _, _, m_c in pieces[1:]:
        m = jnp.maximum(m, m_c)
    num, denom = 0.0, 0.0
    for num_c, denom_c, m_c in pieces:
        weight = jnp.exp(m_c - m)
        num, denom = num + weight[..., None] * num_c, denom + weight * denom_c
    return num / jnp.where(denom > 0, denom, 1.0)[..., None]  # rows with no allowed key give 0


# ---------------------------------------------------------------- one sliceable component: a flash kernel

# q, k, v and the output of one scan step: the chunk (plus its scores) stays in cache while they are formed,
# masked, exponentiated and contracted. In bench train's step (8L-512, T=512, interleaved, matmul 350-420
# GFLOP/s) 1 head per step took 3.0-3.4 s, 2 heads (this budget) 2.9-3.0 s, 4 heads 2.9-3.2 s, the
# unchunked component path 3.3-3.7 s.
CHUNK_BYTES = 1 << 20


def heads_per_chunk(n: int, seq_len: int, d_head: int, itemsize: int) -> int:
    """Heads per scan step on CPU: the largest divisor of n whose q, k, v and output fit CHUNK_BYTES."""
    fitting = max(1, CHUNK_BYTES // (4 * seq_len * d_head * itemsize))
    return max(g for g in range(1, n + 1) if n % g == 0 and g <= fitting)


@functools.lru_cache(maxsize=256)
def _row_blocks(plan: ComponentPlan) -> tuple:
    """(first query, last query + 1, first key, last key + 1, token mask or None when all allowed) per query block."""
    b, rows = plan.block, []
    for row, (first, stop) in enumerate(plan.key_ranges):
        q0, q1, k0, k1 = row * b, (row + 1) * b, int(first) * b, int(stop) * b
        mask = np.asarray(plan.mask_fn(np.arange(q0, q1)[:, None], np.arange(k0, k1)[None, :]))
        rows.append((q0, q1, k0, k1, None if mask.all() else mask))
    return tuple(rows)


def _masked_scores(q, k, mask):
    s = jnp.einsum("nqd,nkd->nqk", q, k, preferred_element_type=jnp.float32)
    return s if mask is None else jnp.where(mask, s, NEG)


def _chunk_forward(plan: ComponentPlan, q, k, v):
    """Output [n, T, D] (f32) and row log-sum-exp [n, T] of one chunk of heads; a row with no allowed key
    gets output 0 and log-sum-exp +1e30, so that its recomputed probabilities are 0."""
    outs, lses = [], []
    for q0, q1, k0, k1, mask in _row_blocks(plan):
        s = jnp.einsum("nqd,nkd->nqk", q[:, q0:q1], k[:, k0:k1], preferred_element_type=jnp.float32)
        p, l, m = _unnormalised_softmax(s, mask)
        has_key, l_safe = l > 0, jnp.where(l > 0, l, 1.0)
        num = jnp.einsum("nqk,nkd->nqd", p.astype(v.dtype), v[:, k0:k1], preferred_element_type=jnp.float32)
        outs.append(num / l_safe[..., None])
        lses.append(jnp.where(has_key, m + jnp.log(l_safe), -NEG))
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def _transposed_key_grad(x, g):
    """xᵀ·g per head, [n, D, keys]: x [n, rows, D], g [n, rows, keys] (f32 accumulation)."""
    return jnp.einsum("nqd,nqk->ndk", x, g.astype(x.dtype), preferred_element_type=jnp.float32)


def _chunk_backward(plan: ComponentPlan, q, k, v, out, lse, d_out):
    """Gradients of one chunk: the scores and probabilities are recomputed from q, k and the saved log-sum-exp.
    Key gradients are formed transposed (dkᵀ = qᵀ·ds): XLA:CPU runs that contraction at twice the speed
    of dsᵀ·q, and the transpose back is one chunk-sized copy."""
    n, T, D = q.shape
    f32 = jnp.float32
    delta = jnp.sum(d_out.astype(f32) * out, axis=-1)  # rowsum(dO ∘ O) = Σ_j p_ij dp_ij
    dq_rows = []
    dk_t, dv_t = jnp.zeros((n, D, T), f32), jnp.zeros((n, D, T), f32)
    for q0, q1, k0, k1, mask in _row_blocks(plan):
        q_r, k_r, v_r, do_r = q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], d_out[:, q0:q1]
        p = jnp.exp(_masked_scores(q_r, k_r, mask) - lse[:, q0:q1, None])
        dp = jnp.einsum("nqd,nkd->nqk", do_r, v_r, preferred_element_type=f32)
        ds = p * (dp - delta[:, q0:q1, None])
        dq_rows.append(jnp.einsum("nqk,nkd->nqd", ds.astype(k.dtype), k_r, preferred_element_type=f32))
        dk_t = dk_t.at[:, :, k0:k1].add(_transposed_key_grad(q_r, ds))
        dv_t = dv_t.at[:, :, k0:k1].add(_transposed_key_grad(do_r, p))
    dq = jnp.concatenate(dq_rows, axis=1)
    return dq.astype(q.dtype), jnp.swapaxes(dk_t, 1, 2).astype(k.dtype), jnp.swapaxes(dv_t, 1, 2).astype(v.dtype)


def _in_chunks(x, heads: int):
    return x.reshape(x.shape[0] // heads, heads, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def flash_attention(plan: ComponentPlan, heads: int, q, k, v):
    """Softmax attention of one component whose query blocks read contiguous key runs (plan.key_ranges):
    q (already scaled), k, v [N, T, D] in natural order -> [N, T, D] f32. FlashAttention's scheme (Dao et al.
    2022) in plain JAX: a scan over chunks of `heads` heads, each chunk's scores formed per query block and
    never stored; the backward pass recomputes them from the saved row log-sum-exp."""
    return _flash_forward(plan, heads, q, k, v)[0]


def _flash_forward(plan, heads, q, k, v):
    N, T, D = q.shape
    out, lse = jax.lax.map(lambda x: _chunk_forward(plan, *x), tuple(_in_chunks(t, heads) for t in (q, k, v)))
    out, lse = out.reshape(N, T, D), lse.reshape(N, T)
    return out, (q, k, v, out, lse)


def _flash_backward(plan, heads, residuals, d_out):
    N, T, D = residuals[0].shape
    chunks = tuple(_in_chunks(t, heads) for t in (*residuals, d_out))
    grads = jax.lax.map(lambda x: _chunk_backward(plan, *x), chunks)
    return tuple(g.reshape(N, T, D) for g in grads)


flash_attention.defvjp(_flash_forward, _flash_backward)


def block_sparse_attention(plans, q, k, v):
    """q, k, v: [B, T, H, D]; causal self-attention under the union of the plans' components. A single
    component with contiguous key runs (dense causal, local bands) takes the flash kernel; on CPU it scans
    over chunks of heads sized to the cache, elsewhere it runs all heads in one step."""
    B, T, H, D = q.shape
    heads_major = lambda x: jnp.swapaxes(x, 1, 2).reshape(B * H, T, D)
    q, k, v = (heads_major(x) for x in (q * jnp.asarray(1.0 / np.sqrt(D), q.dtype), k, v))
    if len(plans) == 1 and plans[0].key_ranges is not None:
        on_cpu = jax.default_backend() == "cpu"
        heads = heads_per_chunk(B * H, T, D, q.dtype.itemsize) if on_cpu else B * H
        out = flash_attention(plans[0], heads, q, k, v)
    else:
        out = merge_components([component_attention(plan, q, k, v) for plan in plans])
    return jnp.swapaxes(out.reshape(B, H, T, D), 1, 2).astype(v.dtype)
