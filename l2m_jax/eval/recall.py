"""In-context recall probes on repeated random tokens: which attention layers copy, and how well a model recalls.

A probe row is `period` token ids drawn uniformly from a range of the vocabulary, then the same ids again (the
induction-head probe of Olsson et al. 2022, "In-context learning and induction heads"). Past the first copy a
model that reads its context predicts every token; attention does it with induction heads (a head at position
i of the second copy looks at the position after the earlier occurrence of token i and copies what is there). A
Mamba layer can do it only as far as its fixed-size state holds the first copy. No text is involved, so a choice
made with these probes cannot see a held-out text.

    repeated_tokens(vocab_size, rows=8, period=64)      int32 [rows, 2 * period]
    induction_scores(model)                             {attention layer: its strongest head's induction score}
    previous_token_scores(model)                        the same for attention on the token just before
    copy_loss(model)                                    mean next-token NLL over the second copy (nats)
    copy_loss_without(model)                            {layer: copy_loss with that layer's mixer output removed}

    python -m l2m_jax.eval.recall --model NAME_OR_DIR [--rows 8] [--period 64] [--seed 0] [--top 4] [--ablate]
prints the scores, the strongest induction layers and the copy loss (with --ablate, without each layer too) for
any model `l2m_jax.load` reads (e.g. `smollm2`, or a run's `final/l2m`). The main job reports every stage's copy
loss on 8 rows of its evaluation window (`recipe.run.copy_nll`).
"""
from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig

__all__ = ["repeated_tokens", "induction_scores", "previous_token_scores", "copy_loss", "copy_loss_without",
           "top_induction_layers"]


def repeated_tokens(vocab_size: int, rows: int = 8, period: int = 64, *, seed: int = 0,
                    low: int | None = None) -> np.ndarray:
    """int32 [rows, 2 * period]: `period` ids drawn uniformly (with replacement) from [low, vocab_size), twice.

    low: the smallest id drawn; default min(1000, vocab_size // 4), which keeps clear of the special and byte
    tokens that byte-level BPE vocabularies put first."""
    if rows < 1 or period < 2:
        raise ValueError(f"repeated_tokens: rows={rows} and period={period} must be >= 1 and >= 2")
    low = min(1000, vocab_size // 4) if low is None else int(low)
    if not 0 <= low < vocab_size - 1:
        raise ValueError(f"repeated_tokens: low={low} leaves fewer than 2 ids of the vocab's {vocab_size}")
    first = np.random.default_rng(seed).integers(low, vocab_size, size=(rows, period), dtype=np.int64)
    return np.concatenate([first, first], axis=1).astype(np.int32)


@functools.lru_cache(maxsize=16)
def _head_scores_fn(cfg: ModelConfig, period: int, back: int):
    from ..models import bind

    @jax.jit
    def fn(params, tokens):
        """{layer: [H]} mean weight from each second-copy position i on position i - back."""
        probs = bind(cfg, params).attention_probabilities(tokens)
        i = jnp.arange(period, 2 * period)
        return {layer: jnp.mean(p[:, :, i, i - back], axis=(0, 2)) for layer, p in probs.items()}
    return fn


def _head_scores(model, back: int, rows, period, seed, per_head, who):
    cfg, params = model
    if not any(m == "attention" for m in cfg.layer_mixers):
        raise ValueError(f"{who}: the model has no attention layer")
    tokens = jnp.asarray(repeated_tokens(cfg.vocab_size, rows, period, seed=seed))
    heads = jax.device_get(_head_scores_fn(cfg, period, back)(params, tokens))
    return {int(i): (np.asarray(h, np.float64) if per_head else float(np.max(h))) for i, h in sorted(heads.items())}


def induction_scores(model, *, rows: int = 8, period: int = 64, seed: int = 0, per_head: bool = False
                     ) -> dict[int, float | np.ndarray]:
    """{attention layer: induction score} of `model` = (cfg, params) on `repeated_tokens` rows.

    A head's score is its mean attention weight, over the rows and the positions i of the second copy, on
    position i - period + 1: the token that followed the earlier occurrence of token i, the one an induction
    head copies. 1 is a perfect induction head; a head spreading its weight evenly scores about 1/i. A layer's
    score is its strongest head's (per_head=True: the [H] array of every head's). Layers that are not attention
    have none."""
    return _head_scores(model, period - 1, rows, period, seed, per_head, "induction_scores")


def previous_token_scores(model, *, rows: int = 8, period: int = 64, seed: int = 0, per_head: bool = False
                          ) -> dict[int, float | np.ndarray]:
    """{attention layer: previous-token score}: as `induction_scores`, on position i - 1 instead. A previous-token
    head is the first half of an induction circuit: it writes which token came before, which an induction head
    in a later layer then looks up."""
    return _head_scores(model, 1, rows, period, seed, per_head, "previous_token_scores")


def top_induction_layers(scores: dict[int, float], k: int) -> list[int]:
    """The `k` layers of `induction_scores` with the highest scores, the highest last (ties: the later layer
    last)."""
    if k < 0 or k > len(scores):
        raise ValueError(f"top_induction_layers: k={k} must lie in [0, {len(scores)}] (the scored layers)")
    ranked = sorted(scores, key=lambda i: (float(scores[i]), i))
    return ranked[len(ranked) - k:]


def _second_copy_nll(logits, tokens, period: int):
    """Mean NLL of tokens period+1 .. 2·period-1 given everything before (the second copy past its start)."""
    logp = jax.nn.log_softmax(logits[:, period:-1].astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, period + 1:, None], axis=-1))


@functools.lru_cache(maxsize=16)
def _ablated_copy_nll_fn(cfg: ModelConfig, period: int):
    from ..models import bind

    @jax.jit
    def fn(params, tokens, layers):
        """[len(layers)] second-copy NLLs, one per layer removed (lax.map: one compiled forward serves all)."""
        model = bind(cfg, params)
        return jax.lax.map(lambda sel: _second_copy_nll(model.logits(model.ablated_hidden(tokens, sel)), tokens,
                                                        period), layers)
    return fn


def copy_loss(model, *, rows: int = 8, period: int = 64, seed: int = 0) -> float:
    """Mean next-token NLL (nats) of `model` = (cfg, params) over the second copy of `repeated_tokens` rows, past
    its first token (which nothing predicts): near 0 for a model that recalls its context, near log(range of
    ids) for one that does not. Runs the held-out scorer's compiled forward (`eval.heldout`), so at
    rows = 8 and 2 · period = the evaluation window it reuses the program the held-out texts compiled."""
    from .heldout import _score

    cfg, params = model
    tokens = jnp.asarray(repeated_tokens(cfg.vocab_size, rows, period, seed=seed))
    nll = _score(cfg, params, tokens)[0]                        # [rows, 2·period - 1]: nll[:, t] predicts t + 1
    return float(jnp.mean(nll[:, period:]))


def copy_loss_without(model, layers=None, *, rows: int = 8, period: int = 64, seed: int = 0) -> dict[int, float]:
    """{layer: `copy_loss` of `model` with that one layer's mixer output removed} for `layers` (None: every
    layer): what each layer contributes to in-context recall, causally (the block's residual and MLP stay)."""
    cfg, params = model
    layers = list(range(cfg.n_layers)) if layers is None else [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < cfg.n_layers]
    if bad:
        raise ValueError(f"copy_loss_without: layers {bad} are not layers of the {cfg.n_layers}-layer model")
    tokens = jnp.asarray(repeated_tokens(cfg.vocab_size, rows, period, seed=seed))
    out = _ablated_copy_nll_fn(cfg, period)(params, tokens, jnp.asarray(layers, jnp.int32))
    return {i: float(v) for i, v in zip(layers, np.asarray(out))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m l2m_jax.eval.recall", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a name or folder l2m_jax.load reads")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--period", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=4, help="name this many strongest induction layers")
    ap.add_argument("--ablate", action="store_true", help="also the copy NLL with each layer's mixer removed")
    a = ap.parse_args(argv)
    from .. import load

    model = load(a.model)
    probe = dict(rows=a.rows, period=a.period, seed=a.seed)
    print(f"{a.model}: {a.rows} rows of {a.period} random ids, twice; pattern {model[0].pattern}")
    if any(m == "attention" for m in model[0].layer_mixers):
        scores = induction_scores(model, **probe)
        print("induction score per attention layer (strongest head): "
              + ", ".join(f"{i}: {v:.3f}" for i, v in scores.items()))
        prev = previous_token_scores(model, **probe)
        print("previous-token score per attention layer (strongest head): "
              + ", ".join(f"{i}: {v:.3f}" for i, v in prev.items()))
        k = min(a.top, len(scores))
        print(f"strongest {k} (weakest of them first): {top_induction_layers(scores, k)}")
    print(f"copy NLL (the second copy, nats per token): {copy_loss(model, **probe):.4f}")
    if a.ablate:
        print("copy NLL with one layer's mixer removed: "
              + ", ".join(f"{i}: {v:.3f}" for i, v in copy_loss_without(model, **probe).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
