"""Fused SSM decode kernels behind one dispatch (installed as `l2m_jax.kernels`).

    y, h = ssm_update(h, x, dt, B, C, A=A, D=D, dt_bias=dt_bias, variant="mamba2", backend="triton")
    y, h_ckpt, h_run, cache = ssm_verify(h_ckpt, cache, n_replay, x, dt, B, C, A=A, D=D, dt_bias=dt_bias)

backend: "xla" (pure-JAX reference, anywhere), "pallas" (GPU, or CPU with interpret=True), "triton"
(CUDA GPU with jax-triton 0.3.1). Semantics and shapes: reference.py; dispatch rules: dispatch.py.
"""

from .dispatch import BACKENDS, BackendUnavailableError, available_backends, ssm_update, ssm_verify
from .reference import ssm_update_ref, ssm_verify_ref

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "ssm_update",
    "ssm_update_ref",
    "ssm_verify",
    "ssm_verify_ref",
]
