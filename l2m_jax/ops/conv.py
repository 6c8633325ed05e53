"""Causal depthwise conv1d over time (the short conv in front of every Mamba mixer).

Tap order: with a kernel `w` of shape [W, C], tap W-1 multiplies the current input and tap 0 the input
W-1 steps back, so `y_t = b + sum_k w[k] * x_{t-(W-1)+k}`. The conv state is the previous W-1 inputs,
oldest first ([B, W-1, C]); a zero state means a fresh sequence. No activation here: callers apply SiLU.

Masking: a masked position (mask False) is treated as absent. It feeds zeros into the window, and it is
skipped when the new state is formed, so the state is the last W-1 *real* inputs. A right-padded row
(real tokens, then pads) therefore ends in exactly the state it would have alone, and so does a left-padded
row that starts from a zero state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["causal_conv1d", "conv_step", "causal_conv1d_ref"]


def _check_kernel(w, b, channels: int) -> int:
    if w.ndim != 2 or w.shape[1] != channels:
        raise ValueError(
            f"conv kernel w must have shape [W, C] = [W, {channels}], got {tuple(w.shape)}; "
            "store it as (taps, channels), tap W-1 = current input"
        )
    width = w.shape[0]
    if width < 1:
        raise ValueError("conv kernel w needs at least one tap (W >= 1)")
    if b is not None and tuple(b.shape) != (channels,):
        raise ValueError(f"conv bias b must have shape [C] = [{channels}], got {tuple(b.shape)}")
    return width


def _check_state(state, batch: int, width: int, channels: int) -> None:
    want = (batch, width - 1, channels)
    if tuple(state.shape) != want:
        raise ValueError(
            f"conv state must have shape [B, W-1, C] = {list(want)}, got {tuple(state.shape)}; "
            "pass the previous W-1 inputs (oldest first) or None for a fresh sequence"
        )


def _zero_state(batch: int, width: int, channels: int, dtype) -> jax.Array:
    return jnp.zeros((batch, width - 1, channels), dtype)


def causal_conv1d(
    x: jax.Array,  # [B, L, C]
    w: jax.Array,  # [W, C]
    b: jax.Array | None = None,  # [C]
    *,
    state: jax.Array | None = None,  # [B, W-1, C]
    mask: jax.Array | None = None,  # [B, L] bool
) -> tuple[jax.Array, jax.Array]:
    """Causal depthwise conv over a whole sequence.

    Args:
      x: [B, L, C] inputs.
      w: [W, C] kernel; tap W-1 multiplies the current input.
      b: [C] bias or None.
      state: [B, W-1, C] previous inputs (oldest first) or None for zeros.
      mask: [B, L] bool, True = real token, or None (all real).

    Returns:
      y: [B, L, C] in x's dtype (accumulated in fp32).
      new_state: [B, W-1, C], the last W-1 real inputs of concat(state, x), in state's dtype
        (x's dtype when state is None).
    """
    if x.ndim != 3:
        raise ValueError(f"conv input x must have shape [B, L, C], got {tuple(x.shape)}")
    batch, length, channels = x.shape
    width = _check_kernel(w, b, channels)
    if state is None:
        state = _zero_state(batch, width, channels, x.dtype)
    _check_state(state, batch, width, channels)
    if mask is not None:
        if tuple(mask.shape) != (batch, length) or mask.dtype != jnp.bool_:
            raise ValueError(
                f"conv mask must be bool [B, L] = [{batch}, {length}], got {mask.dtype}{tuple(mask.shape)}"
            )
        x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))

    xp = jnp.concatenate([state.astype(jnp.float32), x.astype(jnp.float32)], axis=1)  # [B, W-1+L, C]
    wf = w.astype(jnp.float32)
    y = sum(wf[k] * xp[:, k : k + length] for k in range(width))  # W shifted multiply-adds, fused by XLA
    if b is not None:
        y = y + b.astype(jnp.float32)

    if width == 1:
        new_state = state
    elif mask is None:
        new_state = xp[:, length:].astype(state.dtype)
    else:
        new_state = _last_real(xp, mask, width - 1).astype(state.dtype)
    return y.astype(x.dtype), new_state


def _last_real(
    xp: jax.Array,  # [B, W-1+L, C]
    mask: jax.Array,  # [B, L] bool
    keep: int,
) -> jax.Array:  # [B, W-1, C]
    """The last `keep` positions of xp whose mask is True; the leading state rows always count as real."""
    real = jnp.concatenate([jnp.ones((mask.shape[0], keep), bool), mask], axis=1)  # [B, W-1+L]
    rank = jnp.cumsum(real.astype(jnp.int32), axis=1)  # 1-based rank of each real position
    total = rank[:, -1:]  # [B, 1], always >= keep
    want = total - keep + 1 + jnp.arange(keep)[None, :]  # [B, W-1] ranks of the last `keep` real inputs
    # index of the first position reaching each wanted rank = the real position holding that rank
    idx = jnp.sum(rank[:, None, :] < want[:, :, None], axis=-1)  # [B, W-1]
    return jnp.take_along_axis(xp, idx[..., None], axis=1)


def conv_step(
    x: jax.Array,  # [B, C]
    w: jax.Array,  # [W, C]
    b: jax.Array | None,  # [C]
    state: jax.Array,  # [B, W-1, C]
) -> tuple[jax.Array, jax.Array]:
    """One decoding step: y = conv over (state, x), state shifted by one.

    Args:
      x: [B, C] the current input.
      w: [W, C] kernel; b: [C] bias or None.
      state: [B, W-1, C] previous inputs, oldest first.

    Returns:
      y: [B, C] in x's dtype; new_state: [B, W-1, C] in state's dtype.
    """
    if x.ndim != 2:
        raise ValueError(f"conv_step input x must have shape [B, C], got {tuple(x.shape)}")
    batch, channels = x.shape
    width = _check_kernel(w, b, channels)
    _check_state(state, batch, width, channels)
    window = jnp.concatenate([state.astype(jnp.float32), x.astype(jnp.float32)[:, None]], axis=1)  # [B, W, C]
    y = jnp.einsum("BWC,WC->BC", window, w.astype(jnp.float32))
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype), window[:, 1:].astype(state.dtype)


def causal_conv1d_ref(
    x: jax.Array,  # [B, L, C]
    w: jax.Array,  # [W, C]
    b: jax.Array | None = None,  # [C]
    *,
    state: jax.Array | None = None,  # [B, W-1, C]
    mask: jax.Array | None = None,  # [B, L] bool
) -> tuple[jax.Array, jax.Array]:
    """Sequential reference for `causal_conv1d`: a Python loop of `conv_step`, same signature and results.

    Two buffers follow the masking rule literally: `window` sees zeros at masked steps (what the outputs
    use), `real` only advances on real tokens (what the returned state is).
    """
    batch, length, channels = x.shape
    width = _check_kernel(w, b, channels)
    if state is None:
        state = _zero_state(batch, width, channels, x.dtype)
    if mask is None:
        mask = jnp.ones((batch, length), bool)
    window, real, ys = state, state, []
    for t in range(length):
        m = mask[:, t]
        xt = jnp.where(m[:, None], x[:, t], jnp.zeros((), x.dtype))
        y, window = conv_step(xt, w, b, window)
        _, advanced = conv_step(xt, w, b, real)
        real = jnp.where(m[:, None, None], advanced, real)
        ys.append(y)
    return jnp.stack(ys, axis=1), real
