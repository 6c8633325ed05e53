"""Perplexity of a causal LM over a token stream, and its command line.

    python -m l2m_jax.eval.perplexity --model smollm2 [--text FILE] [--max-tokens N] [--window W]

The stream is cut into windows of at most `window` tokens (default: the model's context length) that
overlap by one token, so every token after the first is scored exactly once, each with the context of its
own window. Log-probabilities come from an fp32 log-softmax; the sum runs in float64 on the host.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..ops import keyed_jit

__all__ = ["perplexity", "main"]


@keyed_jit(static_argnums=0)
def _window_nll(cfg: ModelConfig, params, tokens, n_valid):  # tokens [1, W] -> [W-1]
    """Negative log-likelihood of tokens[1:n_valid] given their prefix; 0 past n_valid (padding)."""
    from .. import forward

    logits, _ = forward(cfg, params, tokens)
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)  # [W-1, V]
    nll = -jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0]
    return jnp.where(jnp.arange(nll.shape[0]) < n_valid - 1, nll, 0.0)


def perplexity(cfg: ModelConfig, params, token_ids, *, max_tokens: int | None = None,
               window: int | None = None) -> tuple[int, float]:
    """(tokens scored, perplexity) of `token_ids` (int [L]) under the model.

    max_tokens: use only the first `max_tokens` ids. window: the longest forward pass (default and
    maximum: cfg.max_position_embeddings); every window is padded to this length so one compile serves all.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"token_ids must be a 1-D sequence of integer ids, got shape {ids.shape}, dtype {ids.dtype}")
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens={max_tokens}: at least 2 tokens are needed to score one")
        ids = ids[:max_tokens]
    if ids.size < 2:
        raise ValueError(f"token_ids has {ids.size} token(s); perplexity needs at least 2")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}) (the model's vocab); got min {ids.min()}, "
                         f"max {ids.max()}: was the text encoded with the model's tokenizer?")
    limit = cfg.max_position_embeddings
    window = limit if window is None else int(window)
    if not 2 <= window <= limit:
        raise ValueError(f"window={window} must lie in [2, {limit}] (the model's max_position_embeddings)")
    window = min(window, ids.size)

    total, scored = 0.0, 0
    padded = np.zeros((1, window), np.int32)
    for start in range(0, ids.size - 1, window - 1):  # overlap 1: each window's first token is the last target
        chunk = ids[start:start + window]
        padded[:] = 0
        padded[0, :chunk.size] = chunk
        nll = _window_nll(cfg, params, jnp.asarray(padded), chunk.size)
        total += float(np.sum(np.asarray(nll, np.float64)))
        scored += chunk.size - 1
    return scored, math.exp(total / scored)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2m_jax.eval.perplexity", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF dir, .gguf file, l2m/MiL checkpoint dir, or 'smollm2'")
    parser.add_argument("--tokenizer", help="tokenizer source if the model directory has none (default: --model)")
    parser.add_argument("--text", help="UTF-8 text file to score (default: the bundled held-out prose)")
    parser.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text")
    parser.add_argument("--window", type=int, help="longest forward pass (default: the model's context length)")
    args = parser.parse_args(argv)

    import l2m_jax
    from ..assets import heldout_text

    try:
        if args.text is None:
            text, source = heldout_text(), "bundled held-out text"
        else:
            if not os.path.isfile(args.text):
                raise ValueError(f"--text {args.text!r} is not a file; pass a UTF-8 text file")
            with open(args.text, encoding="utf-8") as f:
                text, source = f.read(), args.text
        tokenizer = l2m_jax.load_tokenizer(args.tokenizer or args.model)
        cfg, params = l2m_jax.load(args.model)
        n, ppl = perplexity(cfg, params, tokenizer.encode(text), max_tokens=args.max_tokens, window=args.window)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from e
    print(f"model: {args.model}")
    print(f"text: {source}")
    print(f"tokens scored: {n}")
    print(f"perplexity: {ppl:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
