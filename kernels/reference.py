"""Pure-JAX reference of the fused SSM decode kernels: one step, and the speculative verifier's MultiStep.

Both SSM variants take raw per-token inputs, as a mixer's projections produce them:

Mamba-2 (state h [B, H, P, N]; one scalar decay per head):
    Δ = softplus(dt + dt_bias)        a = exp(Δ A)
    h ← a h + Δ x ⊗ B                 y = h C + D x
  x [B, Gx, P], dt [B, H] (raw: before bias and softplus), B [B, Gb, N], C [B, Gc, N]; head h reads group
  h // (H // G) of each (block-contiguous, like GQA's repeat_kv). Params A, D, dt_bias [H].
Mamba-1 (state h [B, C, N]; a decay per channel and state dim):
    Δ_c = softplus(dt_c + dt_bias_c)  h_c ← exp(Δ_c A_c) ⊙ h_c + Δ_c B_g x_c      y_c = C_g · h_c + D_c x_c
  x, dt [B, C]; B [B, Gb, N], C [B, Gc, N]; channel c reads group c // (C // G). Params A [C, N], D, dt_bias [C].

The arithmetic runs in fp32 (or in the state's dtype when that is wider, which lets a float64 run check the
kernels); y comes back in x's dtype. Inputs are not validated here: `ssm_update` / `ssm_verify` in
dispatch.py check them before calling any backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["mamba2_step", "mamba_step", "ssm_update_ref", "ssm_verify_ref"]


def _to_groups(v: jax.Array, count: int, dtype) -> jax.Array:  # [B, G, ...] -> [B, count, ...]
    """Head (or channel) i reads group i // (count // G): a block-contiguous repeat."""
    return jnp.repeat(v.astype(dtype), count // v.shape[1], axis=1)


def _compute_dtype(h: jax.Array):
    return jnp.promote_types(h.dtype, jnp.float32)


def mamba2_step(
    h: jax.Array,  # [B, H, P, N]
    x: jax.Array,  # [B, Gx, P]
    dt: jax.Array,  # [B, H] raw
    B: jax.Array,  # [B, Gb, N]
    C: jax.Array | None,  # [B, Gc, N], or None to skip the output
    A: jax.Array,  # [H]
    D: jax.Array,  # [H]
    dt_bias: jax.Array,  # [H]
) -> tuple[jax.Array | None, jax.Array]:
    """One Mamba-2 step. Returns y [B, H, P] (compute dtype; None when C is None) and h [B, H, P, N]."""
    f = _compute_dtype(h)
    heads = h.shape[1]
    delta = jax.nn.softplus(dt.astype(f) + dt_bias.astype(f))  # [B, H]
    decay = jnp.exp(delta * A.astype(f))  # [B, H]
    xh = _to_groups(x, heads, f)  # [B, H, P]
    h = decay[..., None, None] * h.astype(f) + (delta[..., None] * xh)[..., None] * _to_groups(B, heads, f)[:, :, None]
    if C is None:
        return None, h
    y = jnp.sum(h * _to_groups(C, heads, f)[:, :, None], axis=-1) + D.astype(f)[:, None] * xh
    return y, h


def mamba_step(
    h: jax.Array,  # [B, C, N]
    x: jax.Array,  # [B, C]
    dt: jax.Array,  # [B, C] raw
    B: jax.Array,  # [B, Gb, N]
    C: jax.Array | None,  # [B, Gc, N], or None to skip the output
    A: jax.Array,  # [C, N]
    D: jax.Array,  # [C]
    dt_bias: jax.Array,  # [C]
) -> tuple[jax.Array | None, jax.Array]:
    """One Mamba-1 step. Returns y [B, C] (compute dtype; None when C is None) and h [B, C, N]."""
    f = _compute_dtype(h)
    channels = h.shape[1]
    delta = jax.nn.softplus(dt.astype(f) + dt_bias.astype(f))  # [B, C]
    xf = x.astype(f)
    h = jnp.exp(delta[..., None] * A.astype(f)) * h.astype(f) + (delta * xf)[..., None] * _to_groups(B, channels, f)
    if C is None:
        return None, h
    y = jnp.sum(h * _to_groups(C, channels, f), axis=-1) + D.astype(f) * xf
    return y, h


_STEPS = {"mamba2": mamba2_step, "mamba": mamba_step}


def ssm_update_ref(h, x, dt, B, C, *, A, D, dt_bias, variant: str = "mamba2"):
    """One decode step: returns (y, h_new), y [B, H, P] / [B, C] in x's dtype, h_new like h."""
    y, h = _STEPS[variant](h, x, dt, B, C, A, D, dt_bias)
    return y.astype(x.dtype), h


def ssm_verify_ref(h_ckpt, cache, n_replay, x, dt, B, C, *, A, D, dt_bias, variant: str = "mamba2"):
    """The verifier's MultiStep as two lax.scans (a masked replay, then the new tokens).

    Args:
      h_ckpt: [B, H, P, N] (Mamba-2) or [B, C, N] (Mamba-1), the state at the last verified token.
      cache: (x, dt, B) of the previous call, each [B, T, ...] shaped like the new inputs.
      n_replay: [B] int, how many cached steps each row replays (0..T) without outputs.
      x, dt, B, C: the T new tokens, [B, T, ...] (per-step shapes in the module docstring).

    Returns:
      y [B, T, ...] in x's dtype; h_ckpt_new (state after the replay); h_run_new (after the T new
      tokens); cache_new = (x, dt, B).
    """
    step = _STEPS[variant]
    length = x.shape[1]
    time_major = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731

    def replay(h, inputs):
        t, xt, dtt, bt = inputs
        _, h_next = step(h, xt, dtt, bt, None, A, D, dt_bias)
        keep = (t < n_replay).reshape((-1,) + (1,) * (h.ndim - 1))  # rows past their count stay put
        return jnp.where(keep, h_next, h), None

    f = _compute_dtype(h_ckpt)
    h, _ = jax.lax.scan(replay, h_ckpt.astype(f), (jnp.arange(length), *map(time_major, cache)))

    def run(h, inputs):
        y, h = step(h, *inputs, A, D, dt_bias)
        return h, y

    h_run, ys = jax.lax.scan(run, h, tuple(map(time_major, (x, dt, B, C))))
    return jnp.moveaxis(ys, 0, 1).astype(x.dtype), h, h_run, (x, dt, B)
