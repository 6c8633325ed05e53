"""The stage-1, SFT and DPO losses from final hidden states and the LM head, chunked along the sequence.

The losses of `losses` take whole logits [B, L, V] in float32: at B·L = 8k tokens and a 128k vocabulary that is
4 GB per tensor, and their backward keeps several such tensors (log-softmax, softmax, their cotangents) alive.
The functions here take the final-normed hidden states [B, L, D] and the head [D, V] instead, and walk the
sequence in chunks of `chunk` positions (a `lax.map`): each chunk's logits [B, C, V] are computed in float32 from
the compute-dtype hidden states and head (exactly `CausalLM.logits`), reduced at once to per-position values
[B, C], and the chunk body is a `jax.checkpoint`, so the backward pass recomputes each chunk's logits instead of
keeping them. No [B, L, V] array exists in the forward or the backward; the largest temporaries are [B, C, V].

The per-position values are then reduced with the same formulas as `losses` (so the results equal them up to
float32 summation order). A length L that is not a multiple of `chunk` is padded with positions whose values
are dropped; chunk >= L runs one chunk of L positions.

    hidden, head = hidden_and_head(cfg, params, tokens)          # [B, L, D], [D, V]
    loss, metrics = sft_loss_chunked(hidden, head, tokens, mask, chunk=512)

Letters: B batch rows, L positions, D model width (Dt: the teacher's), V vocabulary, C positions per chunk,
N chunks (N·C >= L).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..models.causal_lm import bind
from . import losses


def hidden_and_head(cfg: ModelConfig, params: Any, tokens: jax.Array, *, remat: bool | str | None = False,
                    gather: Callable | None = None,
                    ) -> tuple[jax.Array, jax.Array]:   # hidden [B, L, D] in cfg.dtype, head [D, V]
    """(final-normed hidden states, LM head) of `cfg`'s model for tokens int [B, L]: what `forward` turns
    into logits, without the logits.

    The head is the one `CausalLM.logits` applies: the transposed embedding when cfg.tie_embeddings, else
    lm_head.kernel, in its parameter dtype; the chunked functions cast it to the hidden states' dtype per
    chunk, as `CausalLM.logits` does (so the head's gradient is summed over chunks in the parameter dtype,
    float32 for the Trainer's master weights). No id or length check (forward's checked=False).
    gather: as in `CausalLM.hidden` (e.g. `parallel.fsdp_gather(mesh)`), applied to each layer and to the head.
    """
    model = bind(cfg, params)
    hidden, _ = model.hidden(jnp.asarray(tokens, jnp.int32), remat=remat, gather=gather)       # [B, L, D]
    return hidden, _head(model, cfg, gather)


def head_of(cfg: ModelConfig, params: Any, *, gather: Callable | None = None) -> jax.Array:   # [D, V]
    """The LM head `hidden_and_head` returns, without running the model (for hidden states computed before)."""
    return _head(bind(cfg, params), cfg, gather)


def _head(model, cfg: ModelConfig, gather: Callable | None) -> jax.Array:
    head = model.embed.embedding[...].T if cfg.tie_embeddings else model.lm_head.kernel[...]   # [D, V]
    return head if gather is None else gather(head)


def logits_from(hidden: jax.Array, head: jax.Array) -> jax.Array:
    """hidden [B, L, D] (compute dtype), head [D, V] -> float32 logits [B, L, V], exactly as CausalLM.logits."""
    return jnp.einsum("BLD,DV->BLV", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------------------------ chunking
def _check_chunk(chunk: int) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be a positive int (positions per chunk)")
    return chunk


def _check_hidden(name: str, hidden: jax.Array, head: jax.Array) -> None:
    if hidden.ndim != 3:
        raise ValueError(f"{name} must be [B, L, D], got shape {hidden.shape}")
    if head.ndim != 2 or head.shape[0] != hidden.shape[-1]:
        raise ValueError(f"the head of {name} must be [D, V] with D = {hidden.shape[-1]}, got shape {head.shape}")


def _to_chunks(x: jax.Array, c: int, n: int) -> jax.Array:
    """[B, L, ...] -> [N, B, C, ...], zero-padded to N·C positions."""
    b, l = x.shape[:2]
    pad = n * c - l
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, n, c) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1)


def _from_chunks(y: jax.Array, l: int) -> jax.Array:
    """[N, B, C] -> [B, L] (the padded positions dropped)."""
    n, b, c = y.shape
    return jnp.swapaxes(y, 0, 1).reshape(b, n * c)[:, :l]


def _map_chunks(body: Callable, per_position: tuple[jax.Array, ...], consts: tuple[jax.Array, ...],
                chunk: int) -> tuple[jax.Array, ...]:
    """Run body(consts, chunk of each per_position array) over the chunks of the L axis.

    per_position: arrays [B, L, ...]; body gets them as [B, C, ...] and returns a tuple of [B, C] arrays,
    which come back as [B, L]. The body is rematerialised in the backward pass: what the map keeps per chunk
    are its inputs, never the [B, C, V] logits made inside it.
    """
    l = per_position[0].shape[1]
    c = min(_check_chunk(chunk), l)
    n = -(-l // c)
    xs = tuple(_to_chunks(a, c, n) for a in per_position)                      # each [N, B, C, ...]
    step = jax.checkpoint(lambda xs_i: body(consts, *xs_i), prevent_cse=False)
    ys = jax.lax.map(step, xs)                                                 # each [N, B, C]
    return tuple(_from_chunks(y, l) for y in ys)


def _logits(h: jax.Array, head: jax.Array) -> jax.Array:
    """h [B, C, D] (compute dtype), head [D, V] -> float32 logits [B, C, V], exactly as CausalLM.logits."""
    return jnp.einsum("BCD,DV->BCV", h, head.astype(h.dtype), preferred_element_type=jnp.float32)


def _pick(logp: jax.Array, targets: jax.Array) -> jax.Array:
    """logp [B, C, V], targets [B, C] int -> logp at the targets [B, C]."""
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


# ------------------------------------------------------------------------------------------------ log-probs
def token_logprobs_chunked(hidden: jax.Array,    # [B, L, D] final-normed hidden states
                           head: jax.Array,      # [D, V]
                           targets: jax.Array,   # [B, L] int, aligned with the positions
                           chunk: int,
                           ) -> jax.Array:       # [B, L] float32
    """`losses.token_logprobs(hidden @ head, targets)` without the [B, L, V] logits."""
    _check_hidden("hidden", hidden, head)
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets has shape {targets.shape}; it must be the [B, L] of hidden {hidden.shape}")

    def body(consts, h, t):                        # h [B, C, D], t [B, C]
        (w,) = consts
        logp = jax.nn.log_softmax(_logits(h, w), axis=-1)                       # [B, C, V] float32
        return (_pick(logp, t),)

    (lp,) = _map_chunks(body, (hidden, targets), (head,), chunk)
    return lp


def sequence_logprobs_chunked(hidden: jax.Array,   # [B, L, D] from the model run on `tokens`
                              head: jax.Array,     # [D, V]
                              tokens: jax.Array,   # [B, L] int
                              mask: jax.Array,     # [B, L] bool: response tokens
                              chunk: int,
                              ) -> jax.Array:      # [B] float32
    """`losses.sequence_logprobs` (summed response-token log-probs, the DPO input) from hidden states."""
    targets, target_mask = losses.shift_for_next_token(tokens, mask)
    return jnp.sum(token_logprobs_chunked(hidden, head, targets, chunk) * target_mask, axis=-1)


def sft_loss_chunked(hidden: jax.Array,   # [B, L, D] from the model run on `tokens`
                     head: jax.Array,     # [D, V]
                     tokens: jax.Array,   # [B, L] int
                     mask: jax.Array,     # [B, L] bool: response tokens
                     *, chunk: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`losses.sft_loss` from hidden states: (loss, {"loss", "ce", "tokens"})."""
    targets, target_mask = losses.shift_for_next_token(tokens, mask)
    ce = losses._masked_mean(-token_logprobs_chunked(hidden, head, targets, chunk), target_mask)
    return ce, {"loss": ce, "ce": ce, "tokens": jnp.sum(target_mask.astype(jnp.float32))}


# ------------------------------------------------------------------------------------------------ stage 1
def stage1_loss_chunked(s_hidden: jax.Array,   # [B, L, D] student hidden states
                        t_hidden: jax.Array,   # [B, L, Dt] teacher hidden states
                        s_head: jax.Array,     # [D, V]
                        t_head: jax.Array,     # [Dt, V]
                        targets: jax.Array,    # [B, L] int, aligned with the positions
                        mask: jax.Array,       # [B, L] bool
                        *,
                        alpha: float = 1.0,
                        beta: float = 0.1,
                        kl_reduction: str = "token_mean",
                        temperature: float = 1.0,
                        chunk: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`losses.stage1_loss` (α·CE + β·KL(p_teacher ‖ p_student)) from hidden states and heads, chunked.

    Returns what stage1_loss returns: (loss, {"loss", "ce", "kl", "tokens"}), for both kl_reductions. The
    teacher gets a gradient only if the caller lets it (distill_loss_fn stops it).
    """
    _check_hidden("s_hidden", s_hidden, s_head)
    _check_hidden("t_hidden", t_hidden, t_head)
    if s_hidden.shape[:2] != t_hidden.shape[:2] or s_head.shape[1] != t_head.shape[1]:
        raise ValueError(f"student hidden {s_hidden.shape} / head {s_head.shape} and teacher hidden "
                         f"{t_hidden.shape} / head {t_head.shape} must share B, L and V")
    if kl_reduction not in losses.KL_REDUCTIONS:
        raise ValueError(f"reduction={kl_reduction!r}; choose one of {losses.KL_REDUCTIONS}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if targets.shape != s_hidden.shape[:2]:
        raise ValueError(f"targets has shape {targets.shape}; it must be the [B, L] of s_hidden {s_hidden.shape}")
    losses._check_mask("mask", mask, targets.shape)

    def body(consts, hs, ht, t):                   # hs [B, C, D], ht [B, C, Dt], t [B, C]
        ws, wt = consts
        s_logits = _logits(hs, ws)                                              # [B, C, V] float32
        t_logits = _logits(ht, wt)                                              # [B, C, V] float32
        ce = -_pick(jax.nn.log_softmax(s_logits, axis=-1), t)                   # [B, C]
        log_ps = jax.nn.log_softmax(s_logits / temperature, axis=-1)            # [B, C, V]
        log_pt = jax.nn.log_softmax(t_logits / temperature, axis=-1)            # [B, C, V]
        pt = jnp.exp(log_pt)
        kl = jnp.sum(jnp.where(pt > 0, pt * (log_pt - log_ps), 0.0), axis=-1)   # [B, C]
        return ce, kl

    ce_pos, kl_pos = _map_chunks(body, (s_hidden, t_hidden, targets), (s_head, t_head), chunk)   # [B, L] each
    ce = losses._masked_mean(ce_pos, mask)
    if kl_reduction == "mil":
        kl = jnp.sum(kl_pos) / kl_pos.shape[0]
    else:
        kl = losses._masked_mean(kl_pos, mask)
    loss = alpha * ce + beta * kl
    return loss, {"loss": loss, "ce": ce, "kl": kl, "tokens": jnp.sum(mask.astype(jnp.float32))}
