"""A fused Pallas attention decode (flash-decoding): a few new queries against the filled part of a KV cache.

The semantics are those of `l2m_jax.ops.attention.gqa_attention_cached` (the XLA loop it is tested against, with
the full-cache `gqa_attention` behind both): q [B, T, H, P] at positions q_positions [B, T], a cache
k/v [B, S, G, P] with slot = position whose first lengths[b] slots are filled (this call's keys included). Key
slot s is visible to the query at position p iff s <= p and s < lengths[b] (and p - s < sliding_window).

One launch, split-K over the sequence: one program per (batch row, KV group, split j). The program stacks the
group's R = H / G query heads of all T queries into one [T·R, P] tile (padded to a power of two >= 16 rows),
then walks the KV blocks j, j + splits, j + 2·splits, ... that hold filled slots of its row — a trip count read
from lengths[b], so slots past the filled part are never read, however large the cache — with an online softmax
in fp32: two dots per block (scores q·kᵀ and p·v, bf16 operands with fp32 accumulation where the cache is bf16,
fp32 operands at full precision where it is fp32).
Its partial (running max, sum, un-normalised output) goes to HBM and a small XLA combine merges the splits. Slots
that are read but not visible (the tail of the last block) are masked in the scores and in the values, so
whatever they hold cannot leak in; a query that sees no key gives zeros.

On GPU this lowers through Pallas' Triton backend; on CPU it runs with interpret=True. Tiles obey Triton's tl.dot
(P a power of two >= 16, blocks of 16..128 slots), and so do CPU runs, so a CPU test refuses what a GPU would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import tiling

__all__ = ["decode_attention", "decode_tiles", "check_decode_tiling"]

_F32 = jnp.float32
_MIN_DOT = 16


def _pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def check_decode_tiling(head_dim: int, capacity: int, block: int | None = None) -> None:
    """Raises a ValueError naming the fix where the kernel cannot tile this cache."""
    if not _pow2(head_dim) or head_dim < _MIN_DOT:
        raise ValueError(f"the pallas attention decode needs head_dim to be a power of two >= {_MIN_DOT} (Triton's "
                         f"dot tiles), got {head_dim}; use set_decode_attention('blocked') or 'full' for this model")
    if capacity < _MIN_DOT:
        raise ValueError(f"the pallas attention decode needs a KV cache of at least {_MIN_DOT} slots, got "
                         f"{capacity}; allocate a larger state or use set_decode_attention('blocked') or 'full'")
    if block is not None and (not isinstance(block, int) or not _pow2(block) or not _MIN_DOT <= block <= 128):
        raise ValueError(f"block must be a power of two in [{_MIN_DOT}, 128], got {block!r}; leave it None for the "
                         "default")


def decode_tiles(batch: int, groups: int, capacity: int, block: int | None = None) -> tuple[int, int]:
    """(block, splits): KV slots per block (64, fewer for a small cache) and programs per (row, group) along
    the sequence: enough that batch · groups · splits gives every multiprocessor a couple of programs, never
    more than the cache has blocks."""
    if block is None:
        block = 64
    block = min(block, 1 << (capacity.bit_length() - 1))            # a block never exceeds the cache
    blocks = -(-capacity // block)
    splits = 1
    while splits * 2 <= blocks and batch * groups * splits < 2 * 132:
        splits *= 2
    return block, splits


def _kernel(len_ref, pos_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, block: int, splits: int,
            capacity: int, scale: float, window: int | None):
    """q [Tq, P], pos [Tq] (-1: a pad row), k/v [S, P] -> acc [Tq, P], m and l [Tq] (fp32 partials)."""
    j = pl.program_id(2)
    length = jnp.minimum(len_ref[0], capacity)
    trips = jnp.maximum((length + block - 1) // block - j + splits - 1, 0) // splits
    q = q_ref[...]
    pos = pos_ref[...]
    rows = q.shape[0]

    def body(u, carry):
        m, l, acc = carry                                   # [Tq], [Tq], [Tq, P] fp32
        lo = (j + u * splits) * block
        start = jnp.minimum(lo, capacity - block)           # the last block shifts back when block does not divide S
        kb = k_ref[pl.ds(start, block), :]
        vb = v_ref[pl.ds(start, block), :]
        slot = start + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        filled = (slot >= lo) & (slot < length)             # slots of this block not counted by an earlier one
        vis = (slot[None, :] <= pos[:, None]) & filled[None, :]                               # [Tq, block]
        if window is not None:
            vis &= (pos[:, None] - slot[None, :]) < window
        scores = tiling.dot(q.astype(kb.dtype), kb, (1, 1)) * scale
        scores = jnp.where(vis, scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # nothing visible yet: no inf - inf
        w = jnp.where(vis, jnp.exp(scores - m_safe[:, None]), 0.0)
        corr = jnp.exp(m - m_safe)                          # m = -inf -> 0
        vb = jnp.where(filled[:, None], vb, jnp.zeros((), vb.dtype))
        pv = tiling.dot(w.astype(vb.dtype), vb, (1, 0))
        return m_new, l * corr + jnp.sum(w, axis=1), acc * corr[:, None] + pv

    init = (jnp.full((rows,), -jnp.inf, _F32), jnp.zeros((rows,), _F32), jnp.zeros(acc_ref.shape, _F32))
    m, l, acc = jax.lax.fori_loop(0, trips, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def decode_attention(q, k_cache, v_cache, q_positions, lengths, *, sliding_window: int | None = None,
                     block: int | None = None, splits: int | None = None, interpret: bool = False):
    """[B, T, H, P] in q.dtype: attention of q over the filled slots of the cache (module docstring).

    block: KV slots per block (power of two in [16, 128]; default 64); splits: programs per (row, KV group)
    along the sequence (default: `decode_tiles`)."""
    b, t, h, p = q.shape
    capacity, g = k_cache.shape[1], k_cache.shape[2]
    if h % g:
        raise ValueError(f"decode_attention: {h} query heads are not a multiple of {g} kv heads")
    check_decode_tiling(p, capacity, block)
    block, auto_splits = decode_tiles(b, g, capacity, block)
    splits = auto_splits if splits is None else int(splits)
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    r = h // g
    rows = max(_MIN_DOT, tiling.next_pow2(t * r))
    # rows of a program's tile: (query t, head i of the group) -> t * R + i; pad rows sit at position -1 (see nothing)
    qg = jnp.transpose(q.reshape(b, t, g, r, p), (0, 2, 1, 3, 4)).reshape(b, g, t * r, p)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - t * r), (0, 0)))
    pos = jnp.pad(jnp.repeat(q_positions.astype(jnp.int32), r, axis=1), ((0, 0), (0, rows - t * r)),
                  constant_values=-1)
    kernel = functools.partial(_kernel, block=block, splits=splits, capacity=capacity, scale=p ** -0.5,
                                   window=sliding_window)
    part = (None, None, None, rows)
    acc, m, l = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b, g, splits, rows, p), _F32),
                   jax.ShapeDtypeStruct((b, g, splits, rows), _F32),
                   jax.ShapeDtypeStruct((b, g, splits, rows), _F32)),
        grid=(b, g, splits),
        in_specs=[pl.BlockSpec((1,), lambda i, k, j: (i,)),
                  pl.BlockSpec((None, rows), lambda i, k, j: (i, 0)),
                  pl.BlockSpec((None, None, rows, p), lambda i, k, j: (i, k, 0, 0)),
                  pl.BlockSpec((None, capacity, None, p), lambda i, k, j: (i, 0, k, 0)),
                  pl.BlockSpec((None, capacity, None, p), lambda i, k, j: (i, 0, k, 0))],
        out_specs=(pl.BlockSpec(part + (p,), lambda i, k, j: (i, k, j, 0, 0)),
                   pl.BlockSpec(part, lambda i, k, j: (i, k, j, 0)),
                   pl.BlockSpec(part, lambda i, k, j: (i, k, j, 0))),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(rows * p),
        name="attention_decode",
    )(jnp.asarray(lengths, jnp.int32), pos, qg, k_cache, v_cache)
    # merge the splits: each partial is rescaled to the common running max
    top = jnp.max(m, axis=2, keepdims=True)
    top = jnp.where(top == -jnp.inf, 0.0, top)
    w = jnp.exp(m - top)                                                            # a split that saw nothing: 0
    total = jnp.sum(w * l, axis=2)                                                  # [B, G, rows]
    o = jnp.sum(w[..., None] * acc, axis=2) / jnp.where(total > 0, total, 1.0)[..., None]
    o = o[:, :, : t * r].reshape(b, g, t, r, p)
    return jnp.transpose(o, (0, 2, 1, 3, 4)).reshape(b, t, h, p).astype(q.dtype)


def _compiler_params(tile_elements: int):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4 if tile_elements >= 4096 else 2, num_stages=2)
