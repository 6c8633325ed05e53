"""Top-1 agreement between a student and its teacher: how often both predict the same next token."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..models import forward
from ..ops import keyed_jit


@keyed_jit(static_argnums=0)
def _top1(cfg: ModelConfig, params, tokens):
    return jnp.argmax(forward(cfg, params, tokens)[0], axis=-1).astype(jnp.int32)


def top1_predictions(cfg: ModelConfig, params, tokens) -> np.ndarray:
    """The most likely next token at every position: tokens int32 [N, W] -> int32 [N, W]."""
    return np.asarray(_top1(cfg, params, jnp.asarray(tokens, jnp.int32)))


def top1_agreement(student_top1, teacher_top1) -> float:
    """Fraction of positions where the two predictions agree (arrays of the same shape)."""
    a, b = np.asarray(student_top1), np.asarray(teacher_top1)
    if a.shape != b.shape:
        raise ValueError(f"prediction shapes differ: {a.shape} vs {b.shape}")
    return float(np.mean(a == b))
