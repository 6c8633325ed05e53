"""Random, well-scaled problems for the SSM decode kernels (shared by the tests and the benchmark).

Never zeros: a zero state or input hides unwritten outputs and wrong indexing.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["random_problem", "step_args"]


def random_problem(
    seed: int,
    variant: str,
    *,
    batch: int,
    tokens: int,
    dstate: int,
    heads: int = 0,
    head_dim: int = 0,
    channels: int = 0,
    groups: tuple[int, ...] = (1, 1, 1),
    dtype=jnp.float32,
) -> dict:
    """A verification problem: h [B, H, P, N] or [B, C, N] fp32; x, dt, B, C and cache = (x, dt, B) with T tokens
    in `dtype`; n_replay int32 [B] (row 0 replays nothing, row 1 everything, the rest at random); fp32 params.

    groups: (Gx, Gb, Gc) for mamba2, (Gb, Gc) for mamba. Drawn with numpy (no compilation per shape).
    """
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    if variant == "mamba2":
        gx, gb, gc = groups
        width = heads
        h = normal(batch, heads, head_dim, dstate)
        x_shape, a_shape = (gx, head_dim), (heads,)
    else:
        gb, gc = groups
        width = channels
        h = normal(batch, channels, dstate)
        x_shape, a_shape = (channels,), (channels, dstate)
    lead = (batch, tokens)
    new = [normal(*lead, *x_shape), normal(*lead, width), normal(*lead, gb, dstate), normal(*lead, gc, dstate)]
    old = [normal(*lead, *x_shape), normal(*lead, width), normal(*lead, gb, dstate)]
    n_replay = rng.integers(0, tokens + 1, batch).astype(np.int32)
    n_replay[0] = 0
    if batch > 1:
        n_replay[1] = tokens
    x, dt, B, C = (jnp.asarray(a, dtype) for a in new)
    return dict(
        h=jnp.asarray(h),
        cache=tuple(jnp.asarray(a, dtype) for a in old),
        n_replay=jnp.asarray(n_replay),
        x=x,
        dt=dt,
        B=B,
        C=C,
        A=jnp.asarray(-rng.uniform(0.5, 4.0, a_shape).astype(np.float32)),
        D=jnp.asarray(normal(width)),
        # raw dt + dt_bias spans softplus' curved part and both tails: Δ from ~0.003 to ~4
        dt_bias=jnp.asarray(rng.uniform(-4.0, 1.0, width).astype(np.float32)),
    )


def step_args(problem: dict, t: int = 0) -> tuple:
    """(h, x, dt, B, C) for a single decode step on token t of a problem."""
    p = problem
    return (p["h"], p["x"][:, t], p["dt"][:, t], p["B"][:, t], p["C"][:, t])
