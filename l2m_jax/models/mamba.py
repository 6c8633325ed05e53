"""MiL's Mamba-1 mixer (MIL_SPEC §1.5), including its 16-wide chunk repeat of x and B.

The repeat is done on d_state-wide chunks, so q-chunk j pairs with k-chunk j // r (r = d_inner / d_xb):
released MambaInLlama v1 weights depend on it.

Δ = softplus(dt_raw + dt_proj.bias): the bias is added once here. MiL's layer adds its stored bias b twice
(in the dt_proj Linear and again as the scan's delta_bias), Δ = softplus(W·dt_down(u) + 2b), so a MiL
checkpoint's b is 2b here (convert/hf.py) and hybridize's attention-derived inits double the fresh draw.
A freshly built mixer keeps its draw b = softplus^-1(dt), dt log-uniform in [dt_min, dt_max].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..cache import SpecSSMCache, SSMCache
from ..config import ModelConfig
from ..ops import conv as conv_ops
from ..ops import ssm as ssm_ops
from .init import a_log_mamba1_init, dt_bias_init, uniform_fan_in
from .layers import Context, linear
from .mamba2 import replay_conv_window


def repeat_chunks(x, d_state: int, r: int):
    """x [..., d_xb] -> [..., d_xb·r]: each d_state-wide chunk repeated r times in place (repeat_interleave)."""
    shape = x.shape[:-1]
    return jnp.repeat(x.reshape(*shape, x.shape[-1] // d_state, d_state), r, axis=-2).reshape(*shape, -1)


class MambaMixer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        s = cfg.ssm
        if s.d_xb % s.d_state or s.d_inner % s.d_xb or s.dt_rank < 1:
            raise ValueError(f"Mamba-1 mixer needs d_state | d_xb | d_inner and dt_rank >= 1, got {s}")
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        fan_d = uniform_fan_in(cfg.d_model)
        self.in_proj_x = linear(cfg, cfg.d_model, s.d_xb, rngs, fan_d)
        self.in_proj_z = linear(cfg, cfg.d_model, s.d_inner, rngs, fan_d)
        self.B_proj = linear(cfg, cfg.d_model, s.d_xb, rngs, fan_d)
        self.C_proj = linear(cfg, cfg.d_model, s.d_inner, rngs, fan_d)
        self.dt_proj_down = linear(cfg, cfg.d_model, s.dt_rank, rngs, fan_d)
        self.dt_proj = nnx.Dict(
            kernel=nnx.Param(uniform_fan_in(s.dt_rank)(rngs.params(), (s.dt_rank, s.d_inner), pdt)),
            bias=nnx.Param(dt_bias_init(s.dt_min, s.dt_max, s.dt_init_floor)(rngs.params(), (s.d_inner,))))
        self.conv = nnx.Dict(kernel=nnx.Param(uniform_fan_in(s.d_conv)(rngs.params(), (s.d_conv, s.d_inner), pdt)),
                             bias=nnx.Param(uniform_fan_in(s.d_conv)(rngs.params(), (s.d_inner,), pdt)))
        self.A_log = nnx.Param(a_log_mamba1_init(rngs.params(), (s.d_inner, s.d_state)))
        self.D = nnx.Param(jnp.ones((s.d_inner,), jnp.float32))
        self.out_proj = linear(cfg, s.d_inner, cfg.d_model, rngs, uniform_fan_in(s.d_inner))

    def dt_raw(self, u):
        """Δ before bias and softplus: [..., d_inner] (what the verifier caches)."""
        return jnp.einsum("...R,RC->...C", self.dt_proj_down(u), self.dt_proj["kernel"][...].astype(u.dtype))

    def __call__(self, u, ctx: Context, cache: SSMCache | None):
        """u [B, L, D] -> ([B, L, D], new cache)."""
        s = self.cfg.ssm
        b, l, _ = u.shape
        r = s.d_inner // s.d_xb
        x = repeat_chunks(self.in_proj_x(u), s.d_state, r)                                  # [B, L, C]
        z = self.in_proj_z(u)
        B_g = self.B_proj(u).reshape(b, l, s.d_xb // s.d_state, s.d_state)         # channel c reads c // (C/Gb)
        B = jnp.repeat(B_g, r, axis=2)                                                    # [B, L, C/N, N]
        C = self.C_proj(u).reshape(b, l, s.d_inner // s.d_state, s.d_state)
        dt_raw = self.dt_raw(u)
        delta = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_proj["bias"][...])
        w, cb = self.conv["kernel"][...].astype(u.dtype), self.conv["bias"][...].astype(u.dtype)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))                                 # [C, N]
        mask = ctx.mask if ctx.has_mask else None
        if cache is not None and l == 1:  # a decode step: one kernel call on the raw inputs
            from ..kernels.dispatch import ssm_update

            x1, conv_state = conv_ops.conv_step(x[:, 0], w, cb, cache.conv)
            y, h = ssm_update(cache.ssm, jax.nn.silu(x1), dt_raw[:, 0], B_g[:, 0], C[:, 0], A=A, D=self.D[...],
                              dt_bias=self.dt_proj["bias"][...], variant="mamba", backend=ctx.backend)
            y = y[:, None]
            if ctx.has_mask:
                keep = ctx.mask[:, 0]
                h = jnp.where(keep[:, None, None], h, cache.ssm)
                conv_state = jnp.where(keep[:, None, None], conv_state, cache.conv)
        else:
            x, conv_state = conv_ops.causal_conv1d(x, w, cb, state=None if cache is None else cache.conv, mask=mask)
            x = jax.nn.silu(x)
            y, h = ssm_ops.selective_scan(x, delta, A, B, C, D=self.D[...], chunk=min(64, l),
                                          h0=None if cache is None else cache.ssm, mask=mask)
        y = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        out = self.out_proj(y.astype(u.dtype))
        return out, (None if cache is None else SSMCache(conv_state.astype(cache.conv.dtype), h))

    def verify(self, u, ctx: Context, cache: SpecSSMCache):
        """The verifier's MultiStep over T tokens (see Mamba2Mixer.verify)."""
        from ..kernels.dispatch import ssm_verify

        s = self.cfg.ssm
        b, t, _ = u.shape
        x_raw = repeat_chunks(self.in_proj_x(u), s.d_state, s.d_inner // s.d_xb)             # [B, T, C]
        z = self.in_proj_z(u)
        w, cb = self.conv["kernel"][...].astype(u.dtype), self.conv["bias"][...].astype(u.dtype)
        conv_state = replay_conv_window(cache.conv_ckpt, cache.conv_in, ctx.n_replay)
        x, _ = conv_ops.causal_conv1d(x_raw, w, cb, state=conv_state)
        x = jax.nn.silu(x)
        B = self.B_proj(u).reshape(b, t, s.d_xb // s.d_state, s.d_state)     # groups: channel c reads c // (C/Gb)
        C = self.C_proj(u).reshape(b, t, s.d_inner // s.d_state, s.d_state)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        y, h_ckpt, _, (xc, dtc, bc) = ssm_verify(
            cache.ssm_ckpt, (cache.x, cache.dt, cache.B), ctx.n_replay, x, self.dt_raw(u), B, C,
            A=A, D=self.D[...], dt_bias=self.dt_proj["bias"][...], variant="mamba", backend=ctx.backend,
            final_state=False)
        y = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        new = SpecSSMCache(conv_state, x_raw.astype(cache.conv_in.dtype), h_ckpt,
                           xc.astype(cache.x.dtype), dtc.astype(cache.dt.dtype), bc.astype(cache.B.dtype))
        return self.out_proj(y.astype(u.dtype)), new
