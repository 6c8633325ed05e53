"""Batched generation: one prefill with the chunked scan, then a jitted `lax.while_loop` of single steps."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from ..cache import init_state
from ..config import ModelConfig
from ..models import bind
from ..kernels.dispatch import resolve_backend
from ..ops.sampling import GREEDY, Sampling, draw
from ..ops import keyed_jit
from .common import _round_up, check_length, pad_prompts, trim


@keyed_jit(static_argnames=("cfg", "sampling", "max_new", "eos_id", "capacity", "backend"))
def _generate(params, tokens, lens, key, *, cfg: ModelConfig, sampling: Sampling, max_new: int,
              eos_id: int | None, capacity: int, backend: str):
    """tokens int32 [B, Lp] (right-padded), lens int32 [B] -> (new tokens int32 [B, max_new], steps run); its
    programs are keyed on `l2m_jax.ops.switches()` too (`keyed_jit`)."""
    model = bind(cfg, params)
    b, lp = tokens.shape
    rows = jnp.arange(b)
    mask = jnp.arange(lp)[None] < lens[:, None]
    with jax.named_scope("prefill"):
        x, state = model.hidden(tokens, state=init_state(cfg, b, capacity), mask=mask, backend=backend)
        logits = model.logits(x[rows, lens - 1])                                         # [B, V]
    key, k0 = jax.random.split(key)
    tok = draw(logits, sampling, k0)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(tok)
    done = (tok == eos_id) if eos_id is not None else jnp.zeros((b,), bool)

    def cond(c):
        return (c[5] < max_new) & ~jnp.all(c[3])

    def body(c):
        state, out, tok, done, key, step = c
        with jax.named_scope("decode_step"):
            logits, state = model(tok[:, None], state=state, backend=backend)
        key, ks = jax.random.split(key)
        nt = draw(logits[:, 0], sampling, ks)
        out = out.at[:, step].set(nt)
        if eos_id is not None:
            done = done | (nt == eos_id)
        return state, out, nt, done, key, step + 1

    _, out, _, _, _, steps = jax.lax.while_loop(cond, body, (state, out, tok, done, key, jnp.int32(1)))
    return out, steps


def generate(cfg: ModelConfig, params, prompts, max_new_tokens: int, sampling: Sampling | None = None,
             eos_id: int | None = None, key=None, *, backend: str = "xla",
             fallback: bool = False, prompt_bucket: int = 16) -> list[list[int]]:
    """New tokens for each prompt (a list of token-id lists), greedy by default.

    Without `eos_id` exactly `max_new_tokens` tokens come back per prompt; with it, a row stops after its first
    EOS (kept). Prompts of different lengths are batched exactly: pads are masked out of every state.
    backend: the SSM decode-step kernels ("xla" | "pallas" | "triton"); one this machine cannot run raises,
    unless fallback=True, which runs "xla" with a warning.
    prompt_bucket: the padded prompt length is a multiple of it, so calls whose longest prompts fall in one
    bucket reuse one compiled program (a larger bucket: fewer compilations, more padded prefill).
    """
    args, kw = _generate_inputs(cfg, params, prompts, max_new_tokens, sampling, eos_id, key, backend, fallback,
                                prompt_bucket)
    out, steps = _generate(*args, **kw)
    out = np.asarray(out)
    return trim(out, np.full(len(args[2]), int(steps)), eos_id)


def _generate_inputs(cfg, params, prompts, max_new_tokens, sampling, eos_id, key, backend, fallback, prompt_bucket):
    """`_generate`'s (arguments, static keyword arguments) for `generate`'s inputs, checked."""
    backend = resolve_backend(backend, fallback=fallback)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    tokens, lens = pad_prompts(cfg, prompts, bucket=prompt_bucket)
    check_length(cfg, int(lens.max()) + max_new_tokens)
    capacity = _round_up(tokens.shape[1] + max_new_tokens, 16)
    key = jax.random.key(0) if key is None else key
    return ((params, jnp.asarray(tokens), jnp.asarray(lens), key),
            dict(cfg=cfg, sampling=sampling or GREEDY, max_new=max_new_tokens, eos_id=eos_id, capacity=capacity,
                 backend=backend))


def precompile_generate(cfg: ModelConfig, params, batch_size: int, prompt_len: int, max_new_tokens: int,
                        sampling: Sampling | None = None, eos_id: int | None = None, *, backend: str = "xla",
                        fallback: bool = False, prompt_bucket: int = 16) -> bool:
    """Compile the program `generate` runs for `batch_size` prompts whose longest has `prompt_len` tokens (the
    other arguments as `generate`'s) into JAX's persistent compilation cache, so that such a call, from any
    thread, loads it instead of compiling (params may be abstract). Returns False, doing nothing, when that
    cache is off (`jax_compilation_cache_dir` unset)."""
    if batch_size < 1 or prompt_len < 1:
        raise ValueError(f"batch_size={batch_size} and prompt_len={prompt_len} must be >= 1")
    if not jax.config.jax_compilation_cache_dir:
        return False
    prompts = [[0] * prompt_len] + [[0]] * (batch_size - 1)
    args, kw = _generate_inputs(cfg, params, prompts, max_new_tokens, sampling, eos_id, None, backend, fallback,
                                prompt_bucket)
    _generate.lower(*args, **kw).compile()
    return True
