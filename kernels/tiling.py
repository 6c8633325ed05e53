"""Tile sizes shared by the Pallas and Triton kernels.

Each program owns one tile of the state, loads it once, runs every step on it in registers and stores it.
Tiles are powers of two (Triton's tensors must be); the heuristics aim for enough programs to fill the GPU
(H200: 132 multiprocessors) while keeping tiles large enough to move whole cache lines.
"""

from __future__ import annotations

import math

_TARGET_PROGRAMS = 4 * 132


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most cap."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def mamba2_block_p(batch: int, heads: int, head_dim: int, dstate: int) -> int:
    """Rows of P per program for a [P, N] head state: about 1024 state values (2 warps), fewer when the
    batch is too small to give every multiprocessor a few programs. Bigger tiles cost registers (Triton
    keeps the whole tile and the prefetched token inputs in them), hence fewer resident programs."""
    bp = pow2_divisor(head_dim, max(1, 1024 // next_pow2(dstate)))
    while bp > 4 and batch * heads * (head_dim // bp) < _TARGET_PROGRAMS:
        bp //= 2
    return bp


def mamba2_matrix_tiles(batch: int, heads: int, head_dim: int, dstate: int) -> tuple[int, int]:
    """(rows, blocks) for the matrix-form verification: each program takes blocks × rows rows of a [P, N] head
    state, `rows` at a time. rows: about 2048 state values and at least 16 (a dot dimension); three [rows, N]
    fp32 tiles (state in, checkpoint, state out) are live at once, so they stay small. blocks: as many as keep a
    few programs per multiprocessor; a program computes its head's per-token terms (decays, C·Bᵀ) once for all
    its blocks, so large batches take whole heads."""
    rows = pow2_divisor(head_dim, max(16, 2048 // next_pow2(dstate)))
    blocks = 1
    while head_dim % (rows * blocks * 2) == 0 and batch * heads * (head_dim // (rows * blocks * 2)) >= _TARGET_PROGRAMS:
        blocks *= 2
    return rows, blocks


def mamba_block_c(batch: int, channels: int, dstate: int, aligned_to: int | None = None) -> int:
    """Channels per program for a [C, N] state: about 512 state values (1 warp), fewer for small batches.

    aligned_to: when given, the block must divide it (the Pallas kernels read B and C as one group per
    program, so a block may not straddle groups); the Triton kernels gather per channel and pass None.
    """
    cap = max(1, 512 // next_pow2(dstate))
    bc = pow2_divisor(math.gcd(channels, aligned_to) if aligned_to else channels, cap)
    while bc > 8 and batch * (channels // bc) < _TARGET_PROGRAMS:
        bc //= 2
    return bc


def num_warps(tile_elements: int) -> int:
    """About 16 fp32 state values per thread, 1 to 4 warps."""
    return max(1, min(4, tile_elements // 512))


def dot(a, b, contract: tuple[int, int], precision=None):
    """The 2-D dot of the Pallas kernels: contract dim contract[0] of a with contract[1] of b, fp32 accumulation.
    precision None: fp32 operands at full precision (Triton's default would round them to TF32), others as they
    are (bf16 on the tensor cores)."""
    import jax
    import jax.numpy as jnp

    if precision is None and a.dtype == jnp.float32:
        precision = jax.lax.Precision.HIGHEST
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)
