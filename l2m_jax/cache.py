"""Decode state: an explicit pytree passed into `forward` and returned, one entry per layer.

Attention layers keep a preallocated KV cache (slot = position); Mamba layers keep the last W-1 conv inputs
and the fp32 SSM state. `lengths` counts the tokens each row has consumed, so batches of prompts with
different lengths (right-padded, pads masked) stay exact. Created with zeros: jnp.empty is uninitialised.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .config import ModelConfig


class AttnCache(NamedTuple):
    k: jax.Array        # [B, S, G, P]
    v: jax.Array        # [B, S, G, P]


class SSMCache(NamedTuple):
    conv: jax.Array     # [B, W-1, C]   last W-1 inputs of the depthwise conv
    ssm: jax.Array      # [B, H, P, N] (mamba2) or [B, C, N] (mamba), fp32


class SpecSSMCache(NamedTuple):
    """A Mamba layer of a speculative verifier: one SSM state and the inputs of the last call (MIL_SPEC §3).

    The next call replays the first n_replay cached steps from `ssm_ckpt` (the accepted ones), stores the result
    as the new checkpoint and runs its T new tokens; the conv state is rebuilt by pointer from the same window.
    MiL's verifier also keeps the state after the last call's tokens, to continue from it when every draft was
    accepted; here that case replays all T cached steps instead, so a call writes one state, as a decode step does.
    """
    conv_ckpt: jax.Array  # [B, W-1, C]  conv inputs before the last call's first token
    conv_in: jax.Array    # [B, T, C]    the last call's conv inputs
    ssm_ckpt: jax.Array   # state before the last call's first token, fp32 (the one state kept: every call
                          # replays its accepted steps from it, so the state after the last call is not stored)
    x: jax.Array          # [B, T, ...] cached replay inputs: x after conv (pre GQA repeat),
    dt: jax.Array         # [B, T, H | C]  Δ before bias and softplus,
    B: jax.Array          # [B, T, Gb, N]  B after conv


class SpecState(NamedTuple):
    layers: tuple         # AttnCache | SpecSSMCache per layer
    lengths: jax.Array    # int32 [B] committed tokens (the next call's first token sits at this position)
    n_replay: jax.Array   # int32 [B] accepted tokens of the last call, replayed by the next one


class DecodeState(NamedTuple):
    layers: tuple       # one AttnCache | SSMCache per layer
    lengths: jax.Array  # int32 [B] tokens consumed per row

    @property
    def capacity(self) -> int | None:
        """KV slots per row (None for a model without attention)."""
        for c in self.layers:
            if isinstance(c, AttnCache):
                return c.k.shape[1]
        return None


def ssm_conv_channels(cfg: ModelConfig, mixer: str) -> int:
    s = cfg.ssm
    return s.conv_dim_mamba2 if mixer == "mamba2" else s.d_inner


def ssm_state_shape(cfg: ModelConfig, mixer: str, batch: int) -> tuple[int, ...]:
    s = cfg.ssm
    if mixer == "mamba2":
        return (batch, s.n_heads, s.head_dim, s.d_state)
    return (batch, s.d_inner, s.d_state)


def init_state(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> DecodeState:
    """Zero state for `batch` rows and up to `max_len` tokens each (KV capacity)."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"init_state: batch={batch} and max_len={max_len} must be positive")
    dtype = jnp.dtype(dtype or cfg.dtype)
    layers = []
    for mixer in cfg.layer_mixers:
        if mixer == "attention":
            shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
            layers.append(AttnCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
        else:
            conv = jnp.zeros((batch, cfg.ssm.d_conv - 1, ssm_conv_channels(cfg, mixer)), dtype)
            layers.append(SSMCache(conv, jnp.zeros(ssm_state_shape(cfg, mixer, batch), jnp.float32)))
    return DecodeState(tuple(layers), jnp.zeros((batch,), jnp.int32))


def spec_state_from(cfg: ModelConfig, state: DecodeState, t: int) -> SpecState:
    """Turn a prefilled DecodeState into a verifier state for calls of `t` tokens (nothing to replay yet)."""
    s = cfg.ssm
    layers = []
    for mixer, c in zip(cfg.layer_mixers, state.layers):
        if mixer == "attention":
            layers.append(c)
            continue
        b = c.ssm.shape[0]
        dt = c.conv.dtype
        if mixer == "mamba2":
            g = s.d_xb // s.head_dim
            x = jnp.zeros((b, t, g, s.head_dim), dt)
            dts = jnp.zeros((b, t, s.n_heads), dt)
            bb = jnp.zeros((b, t, g, s.d_state), dt)
        else:
            x = jnp.zeros((b, t, s.d_inner), dt)
            dts = jnp.zeros((b, t, s.d_inner), dt)
            bb = jnp.zeros((b, t, s.d_xb // s.d_state, s.d_state), dt)
        conv_in = jnp.zeros((b, t, c.conv.shape[-1]), dt)
        layers.append(SpecSSMCache(c.conv, conv_in, c.ssm, x, dts, bb))
    return SpecState(tuple(layers), state.lengths, jnp.zeros_like(state.lengths))


def state_bytes_per_sequence(cfg: ModelConfig, context: int, dtype=None) -> dict[str, int]:
    """Decode-state bytes of one sequence at `context` tokens, split by kind (for capacity planning)."""
    item = jnp.dtype(dtype or cfg.dtype).itemsize
    out = {"kv": 0, "conv": 0, "ssm": 0}
    for mixer in cfg.layer_mixers:
        if mixer == "attention":
            out["kv"] += 2 * context * cfg.kv_dim * item
        else:
            out["conv"] += (cfg.ssm.d_conv - 1) * ssm_conv_channels(cfg, mixer) * item
            n = 1
            for d in ssm_state_shape(cfg, mixer, 1):
                n *= d
            out["ssm"] += 4 * n
    out["total"] = sum(out.values())
    return out
