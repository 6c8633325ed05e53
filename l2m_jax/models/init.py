"""Initialisers with MiL's distributions (PyTorch defaults for fresh Mamba weights)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def uniform_fan_in(fan_in: int):
    """U(±1/sqrt(fan_in)): torch.nn.Linear / Conv1d default (kaiming_uniform with a=sqrt(5))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    return init


def dt_bias_init(dt_min: float, dt_max: float, floor: float):
    """softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], clamped below at `floor`."""
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    return init


def a_log_mamba2_init(key, shape, dtype=jnp.float32):
    """A ~ U[1, 16] per head; stored as log A."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def a_log_mamba1_init(key, shape, dtype=jnp.float32):
    """S4D-real: A_c,n = n+1 for every channel; stored as log A. shape [C, N]."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)
