"""MiL's Mamba2 mixer (MIL_SPEC §1.4): GQA linear attention with a learned, data-dependent scalar decay."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..cache import SpecSSMCache, SSMCache
from ..config import ModelConfig
from ..ops import conv as conv_ops
from ..ops import ssm as ssm_ops
from ..ops.norms import gated_rms_norm
from .init import a_log_mamba2_init, dt_bias_init, uniform_fan_in
from .layers import Context, linear


def replay_conv_window(conv_ckpt, conv_in, n_replay):
    """The conv state after the first n_replay inputs of the last call: a per-row pointer into
    concat(conv_ckpt, conv_in) [B, W-1+T, C] -> [B, W-1, C]. Rejected inputs are simply never pointed at."""
    buf = jnp.concatenate([conv_ckpt, conv_in.astype(conv_ckpt.dtype)], axis=1)
    w1 = conv_ckpt.shape[1]
    return jax.vmap(lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, w1, axis=0))(buf, n_replay)


def split_in_proj_mamba2(zxbcdt, cfg: ModelConfig):
    """[..., 2·d_inner + 2·d_xb + H] -> z [.., d_inner], xBC [.., 2·d_xb + d_inner], dt [.., H]."""
    s = cfg.ssm
    z, xbc, dt = jnp.split(zxbcdt, [s.d_inner, s.d_inner + s.conv_dim_mamba2], axis=-1)
    return z, xbc, dt


class Mamba2Mixer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        s = cfg.ssm
        if s.d_inner != s.n_heads * s.head_dim or s.d_state != s.head_dim:
            raise ValueError(f"Mamba2 mixer needs d_inner = heads·head_dim and d_state = head_dim, got {s}")
        if s.d_xb % s.head_dim or s.n_heads % (s.d_xb // s.head_dim):
            raise ValueError(f"Mamba2 mixer: d_xb={s.d_xb} must be a whole number of kv groups dividing the heads")
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.in_proj = linear(cfg, cfg.d_model, s.in_proj_dim_mamba2, rngs, uniform_fan_in(cfg.d_model))
        c = s.conv_dim_mamba2
        self.conv = nnx.Dict(kernel=nnx.Param(uniform_fan_in(s.d_conv)(rngs.params(), (s.d_conv, c), pdt)),
                             bias=nnx.Param(uniform_fan_in(s.d_conv)(rngs.params(), (c,), pdt)))
        # A, D, dt_bias stay fp32: tiny, and they sit inside exp/softplus
        self.dt_bias = nnx.Param(dt_bias_init(s.dt_min, s.dt_max, s.dt_init_floor)(rngs.params(), (s.n_heads,)))
        self.A_log = nnx.Param(a_log_mamba2_init(rngs.params(), (s.n_heads,)))
        self.D = nnx.Param(jnp.ones((s.n_heads,), jnp.float32))
        self.norm = nnx.Dict(scale=nnx.Param(jnp.ones((s.d_inner,), pdt)))
        self.out_proj = linear(cfg, s.d_inner, cfg.d_model, rngs, uniform_fan_in(s.d_inner))

    def __call__(self, u, ctx: Context, cache: SSMCache | None):
        """u [B, L, D] -> ([B, L, D], new cache)."""
        cfg, s = self.cfg, self.cfg.ssm
        b, l, _ = u.shape
        g = s.d_xb // s.head_dim
        z, xbc, dt = split_in_proj_mamba2(self.in_proj(u), cfg)
        w, cb = self.conv["kernel"][...].astype(u.dtype), self.conv["bias"][...].astype(u.dtype)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))                                 # [H]
        mask = ctx.mask if ctx.has_mask else None
        D = self.D[...]
        if cache is not None and l == 1:  # a decode step: one kernel call on the raw per-group inputs
            from ..kernels.dispatch import ssm_update

            xbc1, conv_state = conv_ops.conv_step(xbc[:, 0], w, cb, cache.conv)
            x, B, C = jnp.split(jax.nn.silu(xbc1), [s.d_xb, 2 * s.d_xb], axis=-1)
            y, h = ssm_update(cache.ssm, x.reshape(b, g, s.head_dim), dt[:, 0], B.reshape(b, g, s.d_state),
                              C.reshape(b, s.n_heads, s.d_state), A=A, D=D, dt_bias=self.dt_bias[...],
                              variant="mamba2", backend=ctx.backend)
            y = y[:, None]
            if ctx.has_mask:  # a pad leaves both states untouched
                keep = ctx.mask[:, 0]
                h = jnp.where(keep[:, None, None, None], h, cache.ssm)
                conv_state = jnp.where(keep[:, None, None], conv_state, cache.conv)
        else:
            xbc, conv_state = conv_ops.causal_conv1d(xbc, w, cb, state=None if cache is None else cache.conv,
                                                     mask=mask)
            x, B, C = jnp.split(jax.nn.silu(xbc), [s.d_xb, 2 * s.d_xb], axis=-1)
            x = jnp.repeat(x.reshape(b, l, g, s.head_dim), s.n_heads // g, axis=2)          # [B, L, H, P]
            # C carries H groups (from Q), B only G (from K): repeat B block-contiguously to match
            B = jnp.repeat(B.reshape(b, l, g, s.d_state), s.n_heads // g, axis=2)            # [B, L, H, N]
            C = C.reshape(b, l, s.n_heads, s.d_state)                                       # [B, L, H, N]
            delta = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...])            # [B, L, H]
            h0 = None if cache is None else cache.ssm
            backend, interpret = ssm_ops.SSD_BACKEND
            if backend == "pallas":   # fused kernels; any L (padded inside to whole chunks)
                from ..kernels.dispatch import ssd
                from ..kernels.tiling import next_pow2

                chunk = min(s.chunk_size, max(16, next_pow2(l)))   # a short prompt: one chunk
                y, h = ssd(x, delta, A, B, C, D, chunk=chunk, h0=h0, mask=mask, backend="pallas",
                           interpret=interpret)
            else:
                y, h = ssm_ops.ssd_chunked(x, delta, A, B, C, chunk=min(s.chunk_size, l), D=D, h0=h0, mask=mask)
        y = gated_rms_norm(y.reshape(b, l, s.d_inner), z, self.norm["scale"][...], group_size=s.head_dim,
                           eps=s.norm_eps)
        out = self.out_proj(y.astype(u.dtype))
        return out, (None if cache is None else SSMCache(conv_state.astype(cache.conv.dtype), h))

    def verify(self, u, ctx: Context, cache: SpecSSMCache):
        """The verifier's MultiStep over T tokens u [B, T, D]: replay ctx.n_replay cached steps from the
        checkpoint, store the new checkpoint, run the T new steps with outputs — one fused kernel call."""
        from ..kernels.dispatch import ssm_verify

        cfg, s = self.cfg, self.cfg.ssm
        b, t, _ = u.shape
        g = s.d_xb // s.head_dim
        z, xbc_raw, dt = split_in_proj_mamba2(self.in_proj(u), cfg)
        w, cb = self.conv["kernel"][...].astype(u.dtype), self.conv["bias"][...].astype(u.dtype)
        conv_state = replay_conv_window(cache.conv_ckpt, cache.conv_in, ctx.n_replay)
        xbc, _ = conv_ops.causal_conv1d(xbc_raw, w, cb, state=conv_state)
        x, B, C = jnp.split(jax.nn.silu(xbc), [s.d_xb, 2 * s.d_xb], axis=-1)
        x = x.reshape(b, t, g, s.head_dim)                                                   # [B, T, G, P]
        B = B.reshape(b, t, g, s.d_state)                                                    # [B, T, G, N]
        C = C.reshape(b, t, s.n_heads, s.d_state)                                            # [B, T, H, N]
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        y, h_ckpt, _, (xc, dtc, bc) = ssm_verify(
            cache.ssm_ckpt, (cache.x, cache.dt, cache.B), ctx.n_replay, x, dt, B, C,
            A=A, D=self.D[...], dt_bias=self.dt_bias[...], variant="mamba2", backend=ctx.backend,
            final_state=False)
        y = gated_rms_norm(y.reshape(b, t, s.d_inner), z, self.norm["scale"][...], group_size=s.head_dim,
                           eps=s.norm_eps)
        new = SpecSSMCache(conv_state, xbc_raw.astype(cache.conv_in.dtype), h_ckpt,
                           xc.astype(cache.x.dtype), dtc.astype(cache.dt.dtype), bc.astype(cache.B.dtype))
        return self.out_proj(y.astype(u.dtype)), new
