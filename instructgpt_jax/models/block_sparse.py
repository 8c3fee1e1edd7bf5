"""Block-sparse attention in plain JAX (CPU/GPU/TPU): compute only the key blocks a query block needs.

A sparse pattern arrives as one or more disjoint *components*. A component is a token mask
function `mask_fn(i, j)` of absolute query/key positions plus a static token order for queries
and for keys. Reordering tokens is what makes a pattern block-sparse at all: Sparse Transformer's
strided A2 (Child et al. 2019, §4.2, keys i, i-l, i-2l, ...) touches every key block in the natural
order, but becomes block-diagonal once tokens are sorted by i mod l.

For each component, numpy derives a static plan at trace time:
  1. block activity: which (query block, key block) pairs contain at least one allowed token pair;
  2. packing into a [rows, slots] grid. Each row serves one query block (banded layouts), or two
     query blocks whose key lists are concatenated (triangular layouts: the longest list shares a row
     with the shortest, so padding stays small), `segment` telling the two apart; slots past a
     row's lists are padding with valid=False.
The computation gathers the K/V (and, for two-segment rows, Q) blocks of every slot, computes
scores only for those, applies the exact token mask inside each block, and returns the
unnormalised softmax pieces (numerator, denominator, row max) so that components merge exactly.
FLOPs and memory are proportional to the number of slots, i.e. to the block density.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e30  # finite "minus infinity": exp(NEG - m) == 0 for any real row max m


@dataclasses.dataclass(frozen=True, eq=False)
class ComponentPlan:
    """The static block layout of one component (all arrays numpy, computed once per shape)."""
    mask_fn: Callable  # (i, j) -> bool, broadcasting, works on numpy and jax arrays
    q_order: np.ndarray  # [T] position of the query at index p of the component's order
    k_order: np.ndarray  # [T] likewise for keys
    block: int
    q_block: np.ndarray  # [R, M] query block (in q_order) served by each slot
    k_block: np.ndarray  # [R, M] key block (in k_order) gathered into each slot
    valid: np.ndarray  # [R, M] False for padding slots
    segment: np.ndarray  # [R, M] which of the row's query blocks the slot belongs to
    row_blocks: np.ndarray  # [R, G] query blocks of each row; -1 marks an unused segment
    active_blocks: int  # (query block, key block) pairs with at least one allowed token pair

    @property
    def groups(self) -> int:
        return self.row_blocks.shape[1]

    @property
    def slots(self) -> int:
        return self.k_block.size


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


def _pairs_longest_with_shortest(counts: np.ndarray) -> list[tuple[int, ...]]:
    order = np.argsort(-counts, kind="stable")
    n = len(order)
    pairs = [(int(order[a]), int(order[n - 1 - a])) for a in range(n // 2)]
    if n % 2:
        pairs.append((int(order[n // 2]),))
    return pairs


def pack_rows(activity: np.ndarray):
    """Grid of slots for an activity matrix; see the module docstring. Returns numpy arrays
    (q_block, k_block, valid, segment, row_blocks)."""
    n_q = activity.shape[0]
    key_lists = [np.flatnonzero(row) for row in activity]
    counts = np.array([len(keys) for keys in key_lists])
    single_width = max(1, int(counts.max()))
    pairs = _pairs_longest_with_shortest(counts)
    paired_width = max(1, max(int(sum(counts[qb] for qb in pair)) for pair in pairs))
    if n_q >= 2 and len(pairs) * paired_width < 0.8 * n_q * single_width:
        rows, width = pairs, paired_width
    else:
        rows, width = [(qb,) for qb in range(n_q)], single_width
    groups = max(len(row) for row in rows)
    shape = (len(rows), width)
    q_block, k_block = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    valid, segment = np.zeros(shape, bool), np.zeros(shape, np.int32)
    row_blocks = np.full((len(rows), groups), -1, np.int32)
    for r, row in enumerate(rows):
        q_block[r, :] = row[0]
        col = 0
        for g, qb in enumerate(row):
            row_blocks[r, g] = qb
            keys = key_lists[qb]
            q_block[r, col:col + len(keys)] = qb
            k_block[r, col:col + len(keys)] = keys
            valid[r, col:col + len(keys)] = True
            segment[r, col:col + len(keys)] = g
            col += len(keys)
    return q_block, k_block, valid, segment, row_blocks


def plan_component(mask_fn, q_order, k_order, block: int) -> ComponentPlan:
    q_order, k_order = np.asarray(q_order), np.asarray(k_order)
    activity = block_activity(mask_fn, q_order, k_order, block)
    q_block, k_block, valid, segment, row_blocks = pack_rows(activity)
    return ComponentPlan(mask_fn, q_order, k_order, block, q_block, k_block, valid, segment,
                         row_blocks, int(activity.sum()))


def _reorder(x, order: np.ndarray):
    """x[:, order] along the token axis of [N, T, D]; free when the order is natural."""
    return x if is_identity(order) else x[:, order]


def _slot_mask(plan: ComponentPlan):
    """Exact token mask of every slot, [R, M, b, b] (query, key): the pattern inside the block."""
    b = plan.block
    q_pos = jnp.asarray(plan.q_order.reshape(-1, b)[plan.q_block])  # [R, M, b]
    k_pos = jnp.asarray(plan.k_order.reshape(-1, b)[plan.k_block])
    allowed = plan.mask_fn(q_pos[..., :, None], k_pos[..., None, :])
    return allowed & jnp.asarray(plan.valid)[..., None, None]


# Batched matmuls keep a single batch dimension (N = batch*heads*rows[*slots]): XLA:CPU runs
# dots with several batch dimensions at about half the speed.

def _one_segment_rows(plan, q_blocks, k_slots, v_slots):
    """Rows serving one query block each: one [b, D] x [D, M*b] product per row.
    q_blocks [N, Tb, b, D]; k_slots, v_slots [N, R, M, b, D]. Returns [N, R, G=1, b(, D)] pieces."""
    N, R, M, b, D = k_slots.shape
    rows_q = q_blocks if is_identity(plan.row_blocks[:, 0]) else q_blocks[:, plan.row_blocks[:, 0]]
    mask = jnp.swapaxes(_slot_mask(plan), 1, 2).reshape(R, b, M * b)
    s = jnp.einsum("nqd,nkd->nqk", rows_q.reshape(N * R, b, D), k_slots.reshape(N * R, M * b, D),
                   preferred_element_type=jnp.float32).reshape(N, R, b, M * b)
    s = jnp.where(mask, s, NEG)
    m = jax.lax.stop_gradient(s.max(axis=-1))  # softmax is invariant to the shift
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    denom = p.sum(axis=-1)
    num = jnp.einsum("nqk,nkd->nqd", p.astype(v_slots.dtype).reshape(N * R, b, M * b),
                     v_slots.reshape(N * R, M * b, D), preferred_element_type=jnp.float32)
    return num.reshape(N, R, 1, b, D), denom[:, :, None], m[:, :, None]


def _two_segment_rows(plan, q_blocks, k_slots, v_slots):
    """Rows serving two query blocks: per-slot [b, D] x [D, b] products, reductions per segment."""
    N, R, M, b, D = k_slots.shape
    q_slots = q_blocks[:, plan.q_block]  # [N, R, M, b, D]
    mask = _slot_mask(plan)  # [R, M, b, b]
    in_segment = jnp.asarray(plan.segment[..., None] == np.arange(plan.groups))  # [R, M, G]
    s = jnp.einsum("nqd,nkd->nqk", q_slots.reshape(-1, b, D), k_slots.reshape(-1, b, D),
                   preferred_element_type=jnp.float32).reshape(N, R, M, b, b)
    s = jnp.where(mask, s, NEG)
    slot_max = s.max(axis=-1)  # [N, R, M, b]
    m = jnp.where(in_segment[..., None], slot_max[:, :, :, None], NEG).max(axis=2)  # [N, R, G, b]
    m = jax.lax.stop_gradient(m)
    m_of_slot = jnp.take_along_axis(m, jnp.asarray(plan.segment)[None, :, :, None], axis=2)
    p = jnp.where(mask, jnp.exp(s - m_of_slot[..., None]), 0.0)
    seg = in_segment.astype(jnp.float32)
    denom = jnp.einsum("nrmq,rmg->nrgq", p.sum(axis=-1), seg)
    pv = jnp.einsum("nqk,nkd->nqd", p.astype(v_slots.dtype).reshape(-1, b, b), v_slots.reshape(-1, b, D),
                    preferred_element_type=jnp.float32).reshape(N, R, M, b, D)
    num = jnp.einsum("nrmqd,rmg->nrgqd", pv, seg)
    return num, denom, m


def _natural_token_index(plan: ComponentPlan) -> np.ndarray:
    """[T] index into the flattened (row, segment, position-in-block) outputs of natural token t."""
    b, groups = plan.block, plan.groups
    flat_of_block = np.zeros(len(plan.q_order) // b, np.int64)
    for r, row in enumerate(plan.row_blocks):
        for g, qb in enumerate(row):
            if qb >= 0:
                flat_of_block[qb] = (r * groups + g) * b
    flat_of_index = (flat_of_block[:, None] + np.arange(b)[None]).reshape(-1)
    natural_index = np.empty_like(flat_of_index)
    natural_index[plan.q_order] = flat_of_index  # token q_order[p] sits at component index p
    return natural_index


def component_attention(plan: ComponentPlan, q, k, v):
    """q (already scaled), k, v: [N, T, D] in natural order (N = batch*heads). Returns this
    component's softmax pieces in natural order: numerator [N, T, D] (f32), denominator [N, T],
    row max [N, T]."""
    N, T, D = q.shape
    b = plan.block
    q_blocks = _reorder(q, plan.q_order).reshape(N, T // b, b, D)
    k_slots = _reorder(k, plan.k_order).reshape(N, T // b, b, D)[:, plan.k_block]
    v_slots = _reorder(v, plan.k_order).reshape(N, T // b, b, D)[:, plan.k_block]
    rows = _one_segment_rows if plan.groups == 1 else _two_segment_rows
    num, denom, m = rows(plan, q_blocks, k_slots, v_slots)
    flat = num.shape[1] * num.shape[2] * b
    num, denom, m = num.reshape(N, flat, D), denom.reshape(N, flat), m.reshape(N, flat)
    index = _natural_token_index(plan)
    if not is_identity(index):
        num, denom, m = num[:, index], denom[:, index], m[:, index]
    return num, denom, m


def merge_components(pieces):
    """Exact softmax over the union of disjoint components from their (num, denom, max) pieces."""
    m = pieces[0][2]
    for _, _, m_c in pieces[1:]:
        m = jnp.maximum(m, m_c)
    num, denom = 0.0, 0.0
    for num_c, denom_c, m_c in pieces:
        weight = jnp.exp(m_c - m)
        num, denom = num + weight[..., None] * num_c, denom + weight * denom_c
    return num / jnp.where(denom > 0, denom, 1.0)[..., None]  # rows with no allowed key give 0


def block_sparse_attention(plans, q, k, v):
    """q, k, v: [B, T, H, D]; causal self-attention under the union of the plans' components."""
    B, T, H, D = q.shape
    heads_major = lambda x: jnp.swapaxes(x, 1, 2).reshape(B * H, T, D)
    q, k, v = (heads_major(x) for x in (q * jnp.asarray(1.0 / np.sqrt(D), q.dtype), k, v))
    out = merge_components([component_attention(plan, q, k, v) for plan in plans])
    return jnp.swapaxes(out.reshape(B, H, T, D), 1, 2).astype(v.dtype)
