"""Input validation for `ssm_update` / `ssm_verify`: shapes, group counts, dtypes, replay counts.

Every check raises one ValueError naming the argument, what it should be and what it was, before any
backend sees the arrays (a Triton kernel given a wrong shape reads out of bounds instead of failing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["VARIANTS", "check_variant", "check_step_inputs", "check_replay"]

VARIANTS = ("mamba2", "mamba")


def check_variant(variant) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _array(name: str, a) -> None:
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise ValueError(f"{name} must be an array (jax.Array or numpy.ndarray), got {type(a).__name__}")


def _floating(name: str, a) -> None:
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {a.dtype}")


def _shape(name: str, a, want: tuple, legend: str) -> None:
    if tuple(a.shape) != tuple(want):
        raise ValueError(f"{name} must have shape {legend} = {list(want)}, got {list(a.shape)}")


def _groups(name: str, a, lead: tuple, tail: int, total: int, what: str, legend: str) -> int:
    """a is [*lead, G, tail]; G must divide `total` (the head or channel count). Returns G."""
    if a.ndim != len(lead) + 2 or tuple(a.shape[: len(lead)]) != lead or a.shape[-1] != tail:
        raise ValueError(f"{name} must have shape {legend} = {list(lead)} + [G, {tail}], got {list(a.shape)}")
    groups = a.shape[-2]
    if groups < 1 or total % groups:
        raise ValueError(
            f"the group count G={groups} of {name} must divide the {what} count {total} "
            f"({what} i reads group i // ({total} // G))"
        )
    return groups


def check_step_inputs(h, x, dt, B, C, A, D, dt_bias, *, variant: str, tokens: int | None, state_name: str = "h"):
    """Checks one decode step (tokens=None: x is [B, ...]) or T tokens (x is [B, T, ...]).

    Mamba-2: h [B, H, P, N] fp32, x [B, (T,) Gx, P], dt [B, (T,) H], B [B, (T,) Gb, N], C [B, (T,) Gc, N],
    A, D, dt_bias [H]. Mamba-1: h [B, C, N] fp32, x and dt [B, (T,) C], B [B, (T,) Gb, N],
    C [B, (T,) Gc, N], A [C, N], D and dt_bias [C].
    """
    named = ((state_name, h), ("x", x), ("dt", dt), ("B", B), ("C", C), ("A", A), ("D", D), ("dt_bias", dt_bias))
    for name, a in named:
        _array(name, a)
        _floating(name, a)
    if h.dtype != jnp.float32:
        raise ValueError(
            f"{state_name} must be float32 (SSM states are kept in fp32), got {h.dtype}; "
            f"pass {state_name}.astype(jnp.float32)"
        )
    want_state = 4 if variant == "mamba2" else 3
    if h.ndim != want_state:
        legend = "[B, H, P, N]" if variant == "mamba2" else "[B, C, N]"
        raise ValueError(f"{state_name} must have shape {legend} for variant={variant!r}, got {list(h.shape)}")
    lead = (h.shape[0],) if tokens is None else (h.shape[0], tokens)
    t = "" if tokens is None else "T, "
    dstate = h.shape[-1]
    if variant == "mamba2":
        _, heads, hdim, _ = h.shape
        _groups("x", x, lead, hdim, heads, "head", f"[B, {t}Gx, P]")
        _shape("dt", dt, lead + (heads,), f"[B, {t}H]")
        _groups("B", B, lead, dstate, heads, "head", f"[B, {t}Gb, N]")
        _groups("C", C, lead, dstate, heads, "head", f"[B, {t}Gc, N]")
        for name, p in (("A", A), ("D", D), ("dt_bias", dt_bias)):
            _shape(name, p, (heads,), "[H]")
    else:
        channels = h.shape[1]
        _shape("x", x, lead + (channels,), f"[B, {t}C]")
        _shape("dt", dt, lead + (channels,), f"[B, {t}C]")
        _groups("B", B, lead, dstate, channels, "channel", f"[B, {t}Gb, N]")
        _groups("C", C, lead, dstate, channels, "channel", f"[B, {t}Gc, N]")
        _shape("A", A, (channels, dstate), "[C, N]")
        for name, p in (("D", D), ("dt_bias", dt_bias)):
            _shape(name, p, (channels,), "[C]")


def check_replay(cache, n_replay, x, dt, B) -> None:
    """cache = (x, dt, B) of the previous call, shaped like the new ones; n_replay int [B] in [0, T]."""
    if not isinstance(cache, (tuple, list)) or len(cache) != 3:
        raise ValueError("cache must be a tuple (x, dt, B) of the previous verification call's inputs")
    for name, old, new in zip(("cache[0] (x)", "cache[1] (dt)", "cache[2] (B)"), cache, (x, dt, B)):
        _array(name, old)
        _floating(name, old)
        if tuple(old.shape) != tuple(new.shape):
            raise ValueError(
                f"{name} must have the new inputs' shape {list(new.shape)} (T tokens per call), got {list(old.shape)}"
            )
    _array("n_replay", n_replay)
    batch, length = x.shape[0], x.shape[1]
    if tuple(n_replay.shape) != (batch,) or not jnp.issubdtype(n_replay.dtype, jnp.integer):
        raise ValueError(
            f"n_replay must be an integer array of shape [B] = [{batch}], got {n_replay.dtype}{list(n_replay.shape)}"
        )
    if not isinstance(n_replay, jax.core.Tracer):
        values = np.asarray(n_replay)
        if values.min(initial=0) < 0 or values.max(initial=0) > length:
            raise ValueError(f"n_replay values must lie in [0, T] = [0, {length}], got {values.tolist()}")
