"""One entry point per job, `ssm_update`, `ssm_verify` and `ssd` (Mamba-2's chunked scan), dispatching to a
backend:

  "xla"     the pure-JAX reference (reference.py); runs anywhere, moves the state once per step.
  "pallas"  jax.experimental.pallas kernels (pallas_ssm.py); on a GPU through Pallas' Triton lowering,
            anywhere with interpret=True (slow; for tests). SSD: pallas_ssd.py (fused forward, XLA backward).
  "triton"  @triton.jit kernels called through jax-triton 0.3.1 (triton_ssm_update.py,
            triton_ssm_verify.py); CUDA GPU only. triton and jax_triton are imported only here, on demand.

A backend this machine cannot run raises BackendUnavailableError naming what it needs and what is
available, unless fallback=True, which warns and runs "xla" instead. Inputs are validated (checks.py)
before any backend sees them. All functions are traceable: call them under jax.jit.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import jax
import jax.numpy as jnp

from . import checks, pallas_ssm, reference

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "ssd", "ssm_update", "ssm_verify"]

BACKENDS = ("xla", "pallas", "triton")


class BackendUnavailableError(ValueError):
    """The requested kernel backend cannot run on this machine."""


@functools.cache
def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend in this jaxlib, or no device
        return False


@functools.cache
def _triton_problem() -> str | None:
    """Why backend="triton" cannot run here, or None when it can."""
    if not _has_gpu():
        return "no GPU is visible to JAX"
    for module in ("triton", "jax_triton"):
        try:
            importlib.import_module(module)
        except ImportError as e:  # jax_triton also raises ImportError without a GPU jaxlib
            return f"`import {module}` failed ({e})"
    return None


def _problem(backend: str, interpret: bool) -> str | None:
    if backend == "xla" or (backend == "pallas" and interpret):
        return None
    if backend == "pallas":
        return None if _has_gpu() else "no GPU is visible to JAX (pass interpret=True to run the Pallas kernels on CPU)"
    return _triton_problem()


def available_backends(interpret: bool = False) -> tuple[str, ...]:
    """The backends that can run here (with `interpret` for Pallas)."""
    return tuple(b for b in BACKENDS if _problem(b, interpret) is None)


_NEEDS = {
    "pallas": "pallas needs a CUDA GPU (Pallas' Triton lowering) or interpret=True",
    "triton": "triton needs a CUDA GPU and jax-triton 0.3.1 (pip install 'l2m_jax[gpu]')",
}


def _resolve(backend: str, interpret: bool, fallback: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if interpret and backend == "triton":
        raise ValueError("interpret=True applies to backend='pallas' only; the triton backend has no interpreter")
    problem = _problem(backend, interpret)
    if problem is None:
        return backend
    message = (
        f"backend={backend!r} is unavailable here: {_NEEDS[backend]}, and {problem}. "
        f"Available: {available_backends(interpret)}."
    )
    if not fallback:
        raise BackendUnavailableError(message + " Pass fallback=True to run backend='xla' instead.")
    warnings.warn(message + " Falling back to backend='xla'.", RuntimeWarning, stacklevel=3)
    return "xla"


def resolve_backend(backend: str, *, fallback: bool = False) -> str:
    """The backend that will run: `backend` if it can run here, "xla" (with a warning) if not and `fallback`,
    else a BackendUnavailableError naming what is missing and what is available."""
    return _resolve(backend, False, fallback)


def _params(A, D, dt_bias):
    # params are read in fp32 by every backend (the kernels load them as fp32 scalars and vectors)
    return tuple(jnp.asarray(p).astype(jnp.float32) for p in (A, D, dt_bias))


def ssm_update(
    h: jax.Array,  # [B, H, P, N] (mamba2) | [B, C, N] (mamba), fp32
    x: jax.Array,  # [B, Gx, P] | [B, C]
    dt: jax.Array,  # [B, H] | [B, C], raw (before dt_bias and softplus)
    B: jax.Array,  # [B, Gb, N]
    C: jax.Array,  # [B, Gc, N]
    *,
    A: jax.Array,  # [H] | [C, N], negative
    D: jax.Array,  # [H] | [C]
    dt_bias: jax.Array,  # [H] | [C]
    variant: str = "mamba2",
    backend: str = "xla",
    interpret: bool = False,
    fallback: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One SSM decode step (semantics in reference.py).

    Returns:
      y: [B, H, P] (mamba2) or [B, C] (mamba), in x's dtype.
      h_new: the state after the step, shaped like h, fp32.
    """
    checks.check_variant(variant)
    checks.check_step_inputs(h, x, dt, B, C, A, D, dt_bias, variant=variant, tokens=None)
    backend = _resolve(backend, interpret, fallback)
    A, D, dt_bias = _params(A, D, dt_bias)
    h, x, dt, B, C = map(jnp.asarray, (h, x, dt, B, C))
    if backend == "xla":
        return reference.ssm_update_ref(h, x, dt, B, C, A=A, D=D, dt_bias=dt_bias, variant=variant)
    if backend == "pallas":
        fn = pallas_ssm.mamba2_update if variant == "mamba2" else pallas_ssm.mamba_update
        return fn(h, x, dt, B, C, A=A, D=D, dt_bias=dt_bias, interpret=interpret)
    from . import triton_ssm_update

    fn = triton_ssm_update.mamba2_update if variant == "mamba2" else triton_ssm_update.mamba_update
    return fn(h, x, dt, B, C, A=A, D=D, dt_bias=dt_bias)


def ssm_verify(
    h_ckpt: jax.Array,  # [B, H, P, N] | [B, C, N], fp32
    cache: tuple[jax.Array, jax.Array, jax.Array],  # (x, dt, B) of the previous call, shaped like the new ones
    n_replay: jax.Array,  # [B] int, 0 <= n_replay <= T
    x: jax.Array,  # [B, T, Gx, P] | [B, T, C]
    dt: jax.Array,  # [B, T, H] | [B, T, C], raw
    B: jax.Array,  # [B, T, Gb, N]
    C: jax.Array,  # [B, T, Gc, N]
    *,
    A: jax.Array,
    D: jax.Array,
    dt_bias: jax.Array,
    variant: str = "mamba2",
    backend: str = "xla",
    interpret: bool = False,
    fallback: bool = False,
    final_state: bool = True,
):
    """The speculative verifier's MultiStep, fused: per row b, start from h_ckpt[b], replay the first
    n_replay[b] cached steps without outputs (the accepted tokens of the previous call), keep that state as
    the new checkpoint, then run the T new tokens emitting y.

    Returns:
      y: [B, T, H, P] (mamba2) or [B, T, C] (mamba), in x's dtype.
      h_ckpt_new: state after the replay (the last verified token), fp32.
      h_run_new: state after the T new tokens, fp32; None with final_state=False, where no kernel writes it
        (one state write per call, as in a step).
      cache_new: (x, dt, B), to pass as `cache` to the next call.

    n_replay is checked against [0, T] when concrete; under jit it is clamped to [0, T], so a kernel never
    reads past the cache.
    """
    checks.check_variant(variant)
    for name, a in (("x", x), ("h_ckpt", h_ckpt)):
        if not hasattr(a, "ndim") or a.ndim < 2:
            raise ValueError(f"{name} must be an array with batch and token axes, got {getattr(a, 'shape', a)!r}")
    tokens = x.shape[1]
    checks.check_step_inputs(h_ckpt, x, dt, B, C, A, D, dt_bias, variant=variant, tokens=tokens, state_name="h_ckpt")
    checks.check_replay(cache, n_replay, x, dt, B)
    backend = _resolve(backend, interpret, fallback)
    A, D, dt_bias = _params(A, D, dt_bias)
    n_replay = jnp.clip(jnp.asarray(n_replay).astype(jnp.int32), 0, tokens)
    h_ckpt, x, dt, B, C = map(jnp.asarray, (h_ckpt, x, dt, B, C))
    cache = tuple(map(jnp.asarray, cache))
    if backend == "xla":
        outs = reference.ssm_verify_ref(
            h_ckpt, cache, n_replay, x, dt, B, C, A=A, D=D, dt_bias=dt_bias, variant=variant
        )[:3]
    elif backend == "pallas":
        fn = pallas_ssm.mamba2_verify if variant == "mamba2" else pallas_ssm.mamba_verify
        outs = fn(h_ckpt, cache, n_replay, x, dt, B, C, A=A, D=D, dt_bias=dt_bias, interpret=interpret,
                  final_state=final_state)
    else:
        from . import triton_ssm_verify

        fn = triton_ssm_verify.mamba2_verify if variant == "mamba2" else triton_ssm_verify.mamba_verify
        outs = fn(h_ckpt, cache, n_replay, x, dt, B, C, A=A, D=D, dt_bias=dt_bias, final_state=final_state)
    y, h_ckpt_new, h_run_new = outs
    return y, h_ckpt_new, h_run_new if final_state else None, (x, dt, B)


def _resolve_ssd(backend: str, interpret: bool, fallback: bool) -> str:
    if backend != "triton":
        return _resolve(backend, interpret, fallback)
    if interpret:
        raise ValueError("interpret=True applies to backend='pallas' only; the triton backend has no interpreter")
    message = "backend='triton' has no SSD kernel: only 'xla' and 'pallas' exist for ssd."
    if not fallback:
        raise BackendUnavailableError(message + " Pass backend='pallas', or fallback=True to run 'xla' instead.")
    warnings.warn(message + " Falling back to backend='xla'.", RuntimeWarning, stacklevel=3)
    return "xla"


def ssd(
    x: jax.Array,  # [B, L, H, P]
    dt: jax.Array,  # [B, L, H], already softplus-ed
    A: jax.Array,  # [H], negative
    B: jax.Array,  # [B, L, G, N]
    C: jax.Array,  # [B, L, G, N]
    D: jax.Array | None = None,  # [H]
    *,
    chunk: int,
    h0: jax.Array | None = None,  # [B, H, P, N] fp32
    mask: jax.Array | None = None,  # [B, L] bool
    backend: str = "xla",
    interpret: bool = False,
    fallback: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Mamba-2's chunked SSD scan (semantics: `l2m_jax.ops.ssm.ssd_chunked`) on a backend.

    "xla" runs `ssd_chunked`; "pallas" the fused kernels of pallas_ssd.py, forward and backward (chunk, P and
    N must be powers of two >= 16). There is no "triton" SSD kernel. The Mamba-2 mixer uses "pallas" after
    `l2m_jax.ops.ssm.set_ssd_backend("pallas")`.

    Returns:
      y: [B, L, H, P] in x's dtype; h_last: [B, H, P, N] fp32.
    """
    from l2m_jax.ops import ssm as ssm_ops  # lazily: the decode kernels above need no l2m_jax

    x, dt, A, B, C = map(jnp.asarray, (x, dt, A, B, C))
    D, h0, mask = (None if a is None else jnp.asarray(a) for a in (D, h0, mask))
    ssm_ops._check_ssd(x, dt, A, B, C, D, h0, mask, time_axis=True)
    ssm_ops._check_chunk(chunk)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    backend = _resolve_ssd(backend, interpret, fallback)
    if backend == "xla":
        return ssm_ops.ssd_chunked(x, dt, A, B, C, chunk=chunk, D=D, h0=h0, mask=mask)
    from . import pallas_ssd

    return pallas_ssd.ssd_chunked_pallas(x, dt, A, B, C, D, chunk=chunk, h0=h0, mask=mask, interpret=interpret)
