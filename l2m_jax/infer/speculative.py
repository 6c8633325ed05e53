"""Speculative decoding for hybrid and pure-Mamba targets, batched, with per-row acceptance.

Each round the draft proposes K tokens; the target runs ONE verifier call over [last, d_1..d_K] (T = K+1
positions). Mamba layers keep one state (the checkpoint) and the last call's inputs: the next call replays the
accepted prefix from it inside the same fused kernel (MIL_SPEC §3, whose second, running state is not kept: when
every draft was accepted the next call replays all of them), so a call writes the state once, as a step does.
Attention layers roll back by length (slot = position, rejected slots are overwritten). The draft, which is
small, keeps a snapshot of its SSM states after each drafted token and rolls back by selecting one.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..cache import AttnCache, DecodeState, SpecState, init_state, spec_state_from
from ..config import ModelConfig
from ..models import bind
from ..kernels.dispatch import resolve_backend
from ..ops import keyed_jit
from ..ops.sampling import GREEDY, Sampling, adjusted_probs, sample, speculative_accept
from .common import _round_up, check_length, pad_prompts, trim


@dataclasses.dataclass(frozen=True)
class SpecStats:
    acceptance_rate: float      # accepted drafts / proposed drafts
    tokens_per_call: float      # emitted tokens per target (verifier) call and row
    target_calls: int           # verifier rounds run (batch-wide)
    accepted: int
    drafted: int


def _ssm_parts(state: DecodeState):
    return tuple(None if isinstance(c, AttnCache) else c for c in state.layers)


def _rollback_draft(state: DecodeState, snaps, idx, base_len):
    """Row b keeps its SSM snapshot idx[b] (snaps: per layer, leaves [K, B, ...]) and length base_len + idx."""
    layers = []
    for c, s in zip(state.layers, snaps):
        if s is None:
            layers.append(c)
        else:
            layers.append(jax.tree.map(lambda a: jax.vmap(lambda col, i: col[i], in_axes=(1, 0))(a, idx), s))
    return DecodeState(tuple(layers), base_len + idx)


@keyed_jit(static_argnames=("t_cfg", "d_cfg", "k", "sampling", "max_new", "eos_id", "capacity", "backend"))
def _speculate(t_params, d_params, tokens, lens, key, *, t_cfg: ModelConfig, d_cfg: ModelConfig, k: int,
               sampling: Sampling, max_new: int, eos_id: int | None, capacity: int, backend: str):
    target, draft = bind(t_cfg, t_params), bind(d_cfg, d_params)
    b, lp = tokens.shape
    rows = jnp.arange(b)
    # both models consume the prompt minus its last token; that token opens the first round
    pre = jnp.arange(lp)[None] < (lens - 1)[:, None]
    _, t_state = target.hidden(tokens, state=init_state(t_cfg, b, capacity), mask=pre, backend=backend)
    t_state = spec_state_from(t_cfg, t_state, k + 1)
    _, d_state = draft.hidden(tokens, state=init_state(d_cfg, b, capacity), mask=pre)
    last = tokens[rows, lens - 1]
    pending = jnp.stack([last, jnp.zeros_like(last)], axis=1)                 # [B, 2]: [t] or [d_K, t]
    pend_mask = jnp.stack([jnp.ones((b,), bool), jnp.zeros((b,), bool)], axis=1)
    width = max_new + k + 1
    out = jnp.zeros((b, width), jnp.int32)
    zeros = jnp.zeros((b,), jnp.int32)

    def cond(c):
        return ~jnp.all(c[7])

    def body(c):
        t_state, d_state, pending, pend_mask, last, out, n_out, done, key, calls, acc, drafted = c
        key, k_d, k_s, k_a = jax.random.split(key, 4)
        # ---- draft K tokens, snapshotting its SSM states after each consumed token
        with jax.named_scope("draft"):
            xh, d_state = draft.hidden(pending, state=d_state, mask=pend_mask)
            n_p = jnp.sum(pend_mask, axis=1)
            q1 = adjusted_probs(draft.logits(xh[rows, n_p - 1]), sampling)
            d1 = sample(q1, k_d)
            base_len = d_state.lengths

            def step(carry, kk):
                st, tok = carry
                lg, st = draft(tok[:, None], state=st)
                q = adjusted_probs(lg[:, 0], sampling)
                nt = sample(q, kk)
                return (st, nt), (q, nt, _ssm_parts(st))

            snap0 = _ssm_parts(d_state)
            (d_end, _), (qs, ds, snaps) = jax.lax.scan(step, (d_state, d1), jax.random.split(k_s, k - 1))
            drafts = jnp.concatenate([d1[:, None], ds.T], axis=1)                       # [B, K]
            q = jnp.concatenate([q1[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)          # [B, K, V]
            snaps = jax.tree.map(lambda s0, s: jnp.concatenate([s0[None], s], axis=0), snap0, snaps)
        # ---- one verifier call over [last, d_1..d_K]
        with jax.named_scope("verify"):
            xh, t_new = target.hidden(jnp.concatenate([last[:, None], drafts], axis=1), state=t_state,
                                      backend=backend)
            p = adjusted_probs(target.logits(xh), sampling)                               # [B, K+1, V]
        n_acc, nxt = speculative_accept(p, q, drafts, k_a)
        active = ~done
        emit = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1).at[rows, n_acc].set(nxt)
        j = jnp.arange(k + 1)[None]
        ok = (j <= n_acc[:, None]) & active[:, None]
        cols = jnp.where(ok, n_out[:, None] + j, width)                                  # width: dropped
        out = out.at[rows[:, None], cols].set(emit, mode="drop")
        n_out = n_out + jnp.where(active, n_acc + 1, 0)
        hit_eos = jnp.any(ok & (emit == eos_id), axis=1) if eos_id is not None else jnp.zeros((b,), bool)
        done = done | hit_eos | (n_out >= max_new)
        # ---- commit: the target replays n_acc+1 tokens next call; the draft rolls back to its snapshot
        t_state = SpecState(t_new.layers, t_state.lengths + n_acc + 1, n_acc + 1)
        idx = jnp.minimum(n_acc, k - 1)
        d_state = _rollback_draft(d_end, snaps, idx, base_len)
        all_in = n_acc == k
        pending = jnp.stack([jnp.where(all_in, drafts[:, -1], nxt), nxt], axis=1)
        pend_mask = jnp.stack([jnp.ones((b,), bool), all_in], axis=1)
        calls = calls + 1
        acc = acc + jnp.sum(jnp.where(active, n_acc, 0))
        drafted = drafted + jnp.sum(active) * k
        return t_state, d_state, pending, pend_mask, nxt, out, n_out, done, key, calls, acc, drafted

    carry = (t_state, d_state, pending, pend_mask, last, out, zeros, jnp.zeros((b,), bool), key,
             jnp.int32(0), jnp.int32(0), jnp.int32(0))
    c = jax.lax.while_loop(cond, body, carry)
    return c[5], c[6], c[9], c[10], c[11]


def speculative_positions(longest_prompt: int, max_new_tokens: int, k: int) -> int:
    """Positions a speculative run may reach: the prompt, max_new_tokens and one last round of K drafts + 1."""
    return longest_prompt + max_new_tokens + k + 1


def check_speculative_fits(cfg: ModelConfig, longest_prompt: int, max_new_tokens: int, k: int, *,
                           model: str = "the target") -> None:
    """Raise if K drafts per round would run past `model`'s context (attention layers: max_position_embeddings).

    speculative_generate applies the same bound with the generic message of forward and generate; call this
    first (as `l2m_jax.recipe.draft.acceptance` does) for an error that names the model and the largest k that
    fits. The last round may start one token short of max_new_tokens and still verify K drafts + 1, so the run
    needs `speculative_positions` positions; a pure-Mamba model has no limit. model: how the error names it.
    """
    needed = speculative_positions(longest_prompt, max_new_tokens, k)
    limit = cfg.max_position_embeddings
    if not cfg.attn_layers or needed <= limit:
        return
    room = limit - longest_prompt - max_new_tokens - 1          # the largest k that fits
    new_room = limit - longest_prompt - 2                        # the largest max_new_tokens with k=1
    if room >= 1:
        fix = f"use k <= {room}, or lower max_new_tokens"
    elif new_room >= 1:
        fix = f"even k=1 does not fit: lower max_new_tokens to at most {new_room}"
    else:
        fix = "the prompt alone fills it: shorten the prompt"
    raise ValueError(f"k={k} does not fit the context of {model}: speculative decoding of a {longest_prompt}-token "
                     f"prompt with max_new_tokens={max_new_tokens} needs {needed} positions (prompt + "
                     f"max_new_tokens + k + 1: the last round verifies k drafts past the last token) but the "
                     f"attention layers of {model} run {limit} (max_position_embeddings); {fix}")


_PROBE_TEXT = "Hello, world! How are you today? The quick brown fox: 1234 + 5678 = 6912."


def _vocabulary(tok) -> dict:
    return {"size": len(tok), "vocab": tok.get_vocab(),
            "probe": [int(t) for t in tok.encode(_PROBE_TEXT, add_special_tokens=False)],
            "specials": [tok.eos_token_id, tok.pad_token_id, tok.bos_token_id]}


def check_draft_vocabulary(target_cfg: ModelConfig, target_tok, draft_cfg: ModelConfig, draft_tok=None, *,
                           target: str = "the target", draft: str = "the draft") -> None:
    """Raise ValueError unless a draft can speculate for a target: the same model vocabulary size and, when
    `draft_tok` is given, a tokenizer equal to the target's (size, token -> id table, the ids of a probe text,
    the special tokens). target, draft: how the error names them."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(f"{draft} has a vocabulary of {draft_cfg.vocab_size} tokens but {target} has "
                         f"{target_cfg.vocab_size}: a speculative draft must share the target's tokenizer; "
                         "distil the draft from the target's own teacher")
    if draft_tok is None:
        return
    a, b = _vocabulary(target_tok), _vocabulary(draft_tok)
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        shown = [f"{k} {b[k]} vs {a[k]}" for k in diff if k != "vocab"]
        raise ValueError(f"the tokenizer saved beside {draft} differs from the one beside {target} "
                         f"({', '.join(diff)} differ{': ' + '; '.join(shown) if shown else ''}); a speculative "
                         "draft must share the target's tokenizer")


def speculative_generate(target, draft, prompts, max_new_tokens: int, k: int = 4, sampling: Sampling | None = None,
                         key=None, *, eos_id: int | None = None, backend: str = "xla", fallback: bool = False):
    """Speculative decoding: (target_cfg, target_params), (draft_cfg, draft_params) -> (new tokens, SpecStats).

    Same prompt / return conventions as `l2m_jax.generate`; greedy by default, in which case the tokens equal
    the target's own greedy decoding. With sampling the output follows the target's distribution exactly
    (Leviathan et al.'s rule). backend / fallback: the verification kernels, as in `l2m_jax.generate`.
    """
    args, kwargs = _speculate_inputs(target, draft, prompts, max_new_tokens, k, sampling, key, eos_id,
                                     resolve_backend(backend, fallback=fallback))
    out, n_out, calls, acc, drafted = _speculate(*args, **kwargs)
    out, n_out = np.asarray(out), np.minimum(np.asarray(n_out), max_new_tokens)
    tokens_out = trim(out, n_out, eos_id)
    calls, acc, drafted = int(calls), int(acc), int(drafted)
    # every active row-round emits its accepted drafts plus one target token
    stats = SpecStats(acceptance_rate=acc / max(drafted, 1), tokens_per_call=1 + k * acc / max(drafted, 1),
                      target_calls=calls, accepted=acc, drafted=drafted)
    return tokens_out, stats


def _speculate_inputs(target, draft, prompts, max_new_tokens: int, k: int, sampling, key, eos_id, backend: str):
    """(args, kwargs) of `_speculate` for `speculative_generate`'s inputs, checked."""
    (t_cfg, t_params), (d_cfg, d_params) = target, draft
    if k < 1:
        raise ValueError(f"k={k}: the draft must propose at least one token per round")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if t_cfg.vocab_size != d_cfg.vocab_size or (t_cfg.eos_token_id != d_cfg.eos_token_id
                                                and None not in (t_cfg.eos_token_id, d_cfg.eos_token_id)):
        raise ValueError(f"draft and target disagree on the vocabulary (sizes {d_cfg.vocab_size} vs "
                         f"{t_cfg.vocab_size}, eos {d_cfg.eos_token_id} vs {t_cfg.eos_token_id}): they must "
                         "share one tokenizer")
    tokens, lens = pad_prompts(t_cfg, prompts)
    # the one length rule of forward and generate (one message); `check_speculative_fits` says which k fits
    needed = speculative_positions(int(lens.max()), max_new_tokens, k)
    check_length(t_cfg, needed)
    check_length(d_cfg, needed)
    capacity = _round_up(tokens.shape[1] + max_new_tokens + k + 1, 16)
    key = jax.random.key(0) if key is None else key
    return ((t_params, d_params, jnp.asarray(tokens), jnp.asarray(lens), key),
            dict(t_cfg=t_cfg, d_cfg=d_cfg, k=k, sampling=sampling or GREEDY, max_new=max_new_tokens, eos_id=eos_id,
                 capacity=capacity, backend=backend))


def precompile_speculative(target, draft, prompts, max_new_tokens: int, ks, sampling: Sampling | None = None, *,
                           eos_id: int | None = None, backend: str = "xla", fallback: bool = False,
                           workers: int | None = None) -> bool:
    """Compile the programs `speculative_generate` runs for these inputs at every K of `ks`, in parallel threads,
    into JAX's persistent compilation cache, so that the calls after it load them instead of compiling one K
    after another. Returns False, doing nothing, when that cache is off (`jax_compilation_cache_dir` unset) or
    `ks` is empty."""
    from concurrent.futures import ThreadPoolExecutor

    ks = [int(k) for k in ks]
    if not jax.config.jax_compilation_cache_dir or not ks:
        return False
    backend = resolve_backend(backend, fallback=fallback)
    jobs = [_speculate_inputs(target, draft, prompts, max_new_tokens, k, sampling, None, eos_id, backend)
            for k in ks]                                     # every K checked before anything compiles
    with ThreadPoolExecutor(max_workers=workers or len(jobs)) as pool:
        list(pool.map(lambda job: _speculate.lower(*job[0], **job[1]).compile(), jobs))
    return True


def shrink(cfg: ModelConfig, params, layers) -> tuple[ModelConfig, dict]:
    """A draft made of a subset of a model's layers (same embeddings and head): a cheap, tokenizer-compatible draft."""
    layers = [int(i) for i in layers]
    if not layers or any(not 0 <= i < cfg.n_layers for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} must be distinct indices of the {cfg.n_layers} layers")
    new_cfg = cfg.replace(n_layers=len(layers), layer_mixers=tuple(cfg.layer_mixers[i] for i in layers),
                          ssm=cfg.ssm if any(cfg.layer_mixers[i] != "attention" for i in layers) else None)
    return new_cfg, dict(params, layers={j: params["layers"][i] for j, i in enumerate(layers)})
