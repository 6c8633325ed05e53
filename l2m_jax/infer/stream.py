"""Incremental generation: the tokens of `l2m_jax.generate`, handed over a few at a time as they are decoded.

`generate_stream` is a Python generator over the same computation as `generate` (one masked prefill, then
single decode steps with the same key splitting), cut into jitted chunks of `chunk` steps; the decode state
stays on the device between chunks. Concatenating what it yields gives exactly `generate`'s tokens for the
same arguments (greedy or sampled with the same key). A consumer that has seen enough (a stop string, a user
interrupt) simply stops iterating: no further chunk is computed. Nothing here prints or reads anything.
"""
from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ..ops import keyed_jit
from ..cache import init_state
from ..config import ModelConfig
from ..kernels.dispatch import resolve_backend
from ..models import bind
from ..ops.sampling import GREEDY, Sampling, draw
from .common import _round_up, check_context, pad_prompts

__all__ = ["generate_stream"]


@keyed_jit(static_argnames=("cfg", "sampling", "capacity", "backend"))
def _prefill(params, tokens, lens, key, *, cfg: ModelConfig, sampling: Sampling, capacity: int, backend: str):
    """The prompt pass and the first new token, as in `generate` (same ops, same key split)."""
    model = bind(cfg, params)
    b, lp = tokens.shape
    rows = jnp.arange(b)
    mask = jnp.arange(lp)[None] < lens[:, None]
    x, state = model.hidden(tokens, state=init_state(cfg, b, capacity), mask=mask, backend=backend)
    logits = model.logits(x[rows, lens - 1])
    key, k0 = jax.random.split(key)
    return state, draw(logits, sampling, k0), key


@keyed_jit(static_argnames=("cfg", "sampling", "n", "backend"))
def _steps(params, state, tok, key, *, cfg: ModelConfig, sampling: Sampling, n: int, backend: str):
    """n decode steps from the last token: (state, last token, key, new tokens int32 [B, n])."""
    model = bind(cfg, params)

    def body(c, _):
        state, tok, key = c
        logits, state = model(tok[:, None], state=state, backend=backend)
        key, ks = jax.random.split(key)
        nt = draw(logits[:, 0], sampling, ks)
        return (state, nt, key), nt

    (state, tok, key), toks = jax.lax.scan(body, (state, tok, key), None, length=n)
    return state, tok, key, toks.T


def generate_stream(cfg: ModelConfig, params, prompts, max_new_tokens: int, sampling: Sampling | None = None,
                    eos_id: int | None = None, key=None, *, backend: str = "xla", fallback: bool = False,
                    prompt_bucket: int = 16, chunk: int = 4) -> Iterator[list[list[int]]]:
    """Yield, per decoded chunk, the new tokens of each prompt: a list (one entry per prompt) of token lists.

    Same arguments and conventions as `l2m_jax.generate`: the first yield holds the first new token of every
    row (straight after the prefill), later yields up to `chunk` tokens each; a row yields nothing more after
    its first EOS (kept), and the stream ends when every row is done or `max_new_tokens` are out.
    """
    backend = resolve_backend(backend, fallback=fallback)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    tokens, lens = pad_prompts(cfg, prompts, bucket=prompt_bucket)
    check_context(cfg, int(lens.max()) + max_new_tokens)
    capacity = _round_up(tokens.shape[1] + max_new_tokens, 16)          # as generate: same shapes, same numerics
    sampling = sampling or GREEDY
    key = jax.random.key(0) if key is None else key
    state, tok, key = _prefill(params, jnp.asarray(tokens), jnp.asarray(lens), key, cfg=cfg, sampling=sampling,
                               capacity=capacity, backend=backend)
    done = np.zeros(len(lens), bool)

    def emit(new: np.ndarray) -> list[list[int]]:
        out = []
        for i, row in enumerate(new):
            got = []
            for t in row:
                if done[i]:
                    break
                got.append(int(t))
                done[i] = eos_id is not None and int(t) == eos_id
            out.append(got)
        return out

    yield emit(np.asarray(tok)[:, None])
    left = max_new_tokens - 1
    while left > 0 and not done.all():
        n = min(chunk, left)
        state, tok, key, new = _steps(params, state, tok, key, cfg=cfg, sampling=sampling, n=n, backend=backend)
        left -= n
        yield emit(np.asarray(new))
