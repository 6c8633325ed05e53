"""Perplexity and top-1 predictions of several held-out texts from one compiled forward pass.

    scores = score_texts(cfg, params, {"persuasion": ids_a, "kjv-john": ids_b}, window=256)
    scores["persuasion"] -> {"tokens": 1624, "perplexity": 61.2, "top1": int32 [rows, W],
                             "context_nll": {"1-15": 4.6, "16-63": 4.2, "64-127": 4.0, "128-255": 3.9}}

The same numbers as `perplexity.perplexity` (windows of `window` tokens overlapping by one, each token after
the first scored once with the context of its own window) and `agreement.top1_predictions` on the text cut into
disjoint rows of `window` tokens, but every window of every text goes through the model in fixed-size batches
of one padded shape: one compilation per model instead of one per call shape, and one launch per batch instead
of one per window. Padding sits after each window's real tokens, so causality keeps it from changing them.
"context_nll" is the mean NLL of the scored tokens grouped by how many tokens of their window precede them
(`CONTEXT_EDGES`): a student's per-group NLL minus its teacher's tells whether it loses most where the context is
short (modelling the text itself) or long (using what came before). "token_nll" (float32 [tokens]) is every
scored token's NLL in text order, "token_entropy" the entropy of the model's prediction there; grouped by the
teacher's entropy (`confidence_groups`), a student's excess NLL tells whether it loses most where the teacher is
near certain (text it knows by heart) or where it is unsure.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..models import forward, shape_structs
from ..ops import keyed_jit

__all__ = ["CONTEXT_EDGES", "CONFIDENCE_EDGES", "score_texts", "score_batch_shape", "precompile_score",
           "context_groups", "confidence_groups"]

CONTEXT_EDGES = (1, 16, 64, 128)   # groups of context length [1, 16), [16, 64), [64, 128), [128, window)
# groups of the teacher's predictive entropy at a position, in nats: < 0.1 (near certain), 0.1-1, 1-3, >= 3. The
# entropy does not depend on which token came, so grouping by it favours neither model; grouping by the teacher's
# NLL of the token would put the tokens it happened to miss in its high groups, where any other model looks better
CONFIDENCE_EDGES = (0.1, 1.0, 3.0)


def confidence_groups(teacher_entropy: np.ndarray) -> dict[str, np.ndarray]:
    """{label: bool mask} of the positions in each `CONFIDENCE_EDGES` group of the teacher's entropy there."""
    entropy = np.asarray(teacher_entropy, np.float64)
    edges = [-np.inf, *CONFIDENCE_EDGES, np.inf]
    labels = [f"<{CONFIDENCE_EDGES[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(CONFIDENCE_EDGES, CONFIDENCE_EDGES[1:])] \
        + [f">={CONFIDENCE_EDGES[-1]:g}"]
    return {label: (entropy >= a) & (entropy < b) for label, a, b in zip(labels, edges, edges[1:])}


def context_groups(window: int) -> list[tuple[str, int, int]]:
    """(label, first, last) context lengths of the `CONTEXT_EDGES` groups that a window of `window` tokens has:
    a scored token at index j of its window has j tokens of context, 1 <= j <= window - 1."""
    edges = [e for e in CONTEXT_EDGES if e < window] + [window]
    return [(f"{a}-{b - 1}", a, b - 1) for a, b in zip(edges, edges[1:])]


@keyed_jit(static_argnums=0)
def _score(cfg: ModelConfig, params, tokens):
    """tokens int32 [N, W] -> (nll of tokens[:, 1:] float32 [N, W-1], argmax int32 [N, W], entropy of the
    predictions of tokens[:, 1:] float32 [N, W-1])."""
    logits = forward(cfg, params, tokens, checked=False)[0].astype(jnp.float32)   # ids checked on the host
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return nll, jnp.argmax(logits, axis=-1).astype(jnp.int32), entropy


def _check_ids(name: str, ids: np.ndarray, vocab: int) -> None:
    if ids.ndim != 1 or ids.size < 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"text {name!r}: token ids must be a 1-D integer array of at least 2 ids, got shape "
                         f"{ids.shape}, dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"text {name!r}: token ids must lie in [0, {vocab}) (the model's vocab); got min "
                         f"{ids.min()}, max {ids.max()}: was it encoded with the model's tokenizer?")


def score_texts(cfg: ModelConfig, params, texts: dict[str, np.ndarray], window: int, *,
                batch_rows: int = 8) -> dict[str, dict]:
    """{name: {"tokens", "perplexity", "top1", "context_nll", "token_nll", "token_entropy"}} for every text (int
    [T] token ids); "token_entropy" is the entropy of the model's prediction of each scored token, in its order.

    Per text the window is w = min(window, T, cfg.max_position_embeddings); "tokens" and "perplexity" equal
    `perplexity(cfg, params, ids, window=w)`, "top1" equals `top1_predictions(cfg, params, rows)` with rows
    = ids[: (T // w) * w].reshape(-1, w). batch_rows: rows per forward pass (the last batch is padded).
    """
    if not texts:
        raise ValueError("score_texts: no texts given")
    if batch_rows < 1:
        raise ValueError(f"batch_rows={batch_rows} must be >= 1")
    if int(window) < 2:
        raise ValueError(f"window={window} must be >= 2")
    window = min(int(window), cfg.max_position_embeddings)
    plans = {}
    for name, ids in texts.items():
        ids = np.asarray(ids)
        _check_ids(name, ids, cfg.vocab_size)
        w = min(window, ids.size)
        ppl_windows = [ids[s:s + w] for s in range(0, ids.size - 1, w - 1)]
        rows = ids.size // w
        plans[name] = (w, ppl_windows, [ids[r * w:(r + 1) * w] for r in range(rows)])
    width = score_batch_shape(cfg, texts, window, batch_rows=batch_rows)[1]
    chunks = [c for _, p, t in plans.values() for c in (*p, *t)]
    n = -(-len(chunks) // batch_rows) * batch_rows
    batch = np.zeros((n, width), np.int32)
    for i, c in enumerate(chunks):
        batch[i, :c.size] = c
    nll, top1, ent = [], [], []
    for s in range(0, n, batch_rows):
        a, b, e = _score(cfg, params, jnp.asarray(batch[s:s + batch_rows]))
        nll.append(np.asarray(a, np.float64))
        top1.append(np.asarray(b))
        ent.append(np.asarray(e))
    nll, top1, ent = np.concatenate(nll), np.concatenate(top1), np.concatenate(ent)
    out, i = {}, 0
    for name, (w, ppl_windows, rows) in plans.items():
        sums, counts = np.zeros(w - 1), np.zeros(w - 1)      # by context length - 1
        token_nll, token_entropy = [], []
        for j, c in enumerate(ppl_windows):
            sums[:c.size - 1] += nll[i + j, :c.size - 1]
            counts[:c.size - 1] += 1
            token_nll.append(nll[i + j, :c.size - 1])
            token_entropy.append(ent[i + j, :c.size - 1])
        scored = int(counts.sum())
        i += len(ppl_windows)
        by_context = {label: float(sums[a - 1:b].sum() / counts[a - 1:b].sum())
                      for label, a, b in context_groups(w) if counts[a - 1:b].sum()}
        out[name] = {"tokens": scored, "perplexity": math.exp(sums.sum() / scored), "top1": top1[i:i + len(rows), :w],
                     "context_nll": by_context, "token_nll": np.concatenate(token_nll).astype(np.float32),
                     "token_entropy": np.concatenate(token_entropy).astype(np.float32)}
        i += len(rows)
    return out


def score_batch_shape(cfg: ModelConfig, texts: dict[str, np.ndarray], window: int, *,
                      batch_rows: int = 8) -> tuple[int, int]:
    """The [rows, width] token batch `score_texts` feeds its compiled forward for these texts."""
    window = min(int(window), cfg.max_position_embeddings)
    return batch_rows, max(min(window, np.asarray(ids).size) for ids in texts.values())


def precompile_score(cfg: ModelConfig, params, shape: tuple[int, int]) -> None:
    """Compile `score_texts`' forward for `cfg` (params may be jax.ShapeDtypeStructs) on token batches of
    `shape` (`score_batch_shape`): a later evaluation in this process reuses the executable (and, with JAX's
    persistent compilation cache on, another process loads it)."""
    _score.lower(cfg, shape_structs(params), jax.ShapeDtypeStruct(shape, jnp.int32)).compile()
