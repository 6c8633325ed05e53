"""Grouped-query causal attention over an explicit key/value set (a sequence or a KV cache)."""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite: a fully masked row (a pad query) gives a uniform, finite output instead of NaN


def attention_mask(q_pos, k_pos, k_valid, *, sliding_window: int | None = None):
    """Boolean [B, Lq, S]: key j is visible to query i.

    q_pos int [B, Lq], k_pos int [B, S], k_valid bool [B, S]. Causal on positions; with a sliding
    window (Mistral) only the last `sliding_window` positions, as HF does (q - k < window).
    """
    m = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    if sliding_window is not None:
        m &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
    return m


def gqa_attention(q, k, v, mask):
    """q [B, Lq, H, P], k/v [B, S, G, P], mask bool [B, Lq, S] -> [B, Lq, H, P] in q.dtype.

    Head h reads kv group h // (H // G) (HF repeat_kv order). Scores and softmax in fp32.
    """
    b, lq, h, p = q.shape
    with jax.named_scope("gqa_attention"):
        w = _grouped_probabilities(q, k, mask, "gqa_attention").astype(v.dtype)
        o = jnp.einsum("BGRLS,BSGP->BLGRP", w, v, preferred_element_type=jnp.float32)
    return o.reshape(b, lq, h, p).astype(q.dtype)


def _grouped_probabilities(q, k, mask, who: str):
    """fp32 softmax weights [B, G, R, Lq, S] of q [B, Lq, H, P] over k [B, S, G, P] (H = G·R) under mask."""
    b, lq, h, p = q.shape
    g = k.shape[2]
    if h % g:
        raise ValueError(f"{who}: {h} query heads are not a multiple of {g} kv heads")
    qg = q.reshape(b, lq, g, h // g, p)
    s = jnp.einsum("BLGRP,BSGP->BGRLS", qg, k, preferred_element_type=jnp.float32) * (p ** -0.5)
    return jax.nn.softmax(jnp.where(mask[:, None, None], s, _NEG), axis=-1)


def gqa_probabilities(q, k, mask):
    """The attention weights `gqa_attention` applies: q [B, Lq, H, P], k [B, S, G, P], mask bool [B, Lq, S] ->
    fp32 [B, H, Lq, S] (head h reads kv group h // (H // G)); a fully masked query row is uniform."""
    w = _grouped_probabilities(q, k, mask, "gqa_probabilities")
    b, g, r, lq, s = w.shape
    return w.reshape(b, g * r, lq, s)


# ---- full-sequence attention (training, scoring, prefill): one switch between implementations ----------------
# Read when a model call is traced, like the decode switch below (`l2m_jax.ops.switches`). "reference" (gqa_attention on a materialised mask) stays the default and is what the
# others are tested against.
#   "reference"  gqa_attention with attention_mask
#   "xla"        jax.nn.dot_product_attention(implementation="xla"): the same math, masks built from lengths
#   "cudnn"      jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention (GPU, bf16/fp16)
#   "auto"       "cudnn" for the calls it can run (on a GPU, bf16/fp16 inputs), "xla" for the others: mixed-
#                precision training steps get flash attention while fp32 evaluation of the same model still runs
ATTN_IMPLS = ("reference", "xla", "cudnn", "auto")
ATTN_IMPL = "reference"


def _check_impl(impl: str) -> str:
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention impl {impl!r}: expected one of {', '.join(map(repr, ATTN_IMPLS))}")
    return impl


def set_attention(impl: str) -> None:
    """Switch the full-sequence attention implementation for programs traced afterwards (`l2m_jax.ops.switches`:
    the library's jitted entry points key their programs on it)."""
    global ATTN_IMPL
    ATTN_IMPL = _check_impl(impl)


@contextlib.contextmanager
def attention_impl(impl: str):
    """`with attention_impl("cudnn"): ...` traces the calls inside with `impl`, then restores the previous one."""
    saved = ATTN_IMPL
    set_attention(impl)
    try:
        yield
    finally:
        set_attention(saved)


def _check_cudnn(q, k, v) -> None:
    """One error listing everything that keeps cuDNN flash attention from running here, with the fix."""
    problems = []
    if jax.default_backend() != "gpu":
        problems.append(f"it runs on a GPU only (this process runs on {jax.default_backend()!r})")
    dts = sorted({str(x.dtype) for x in (q, k, v)})
    if any(d not in ("bfloat16", "float16") for d in dts):
        problems.append(f"it takes bfloat16/float16 inputs only (got {'/'.join(dts)}; set ModelConfig "
                        "dtype='bfloat16')")
    if problems:
        raise ValueError("attention impl 'cudnn' cannot run: " + "; ".join(problems)
                         + ". Use set_attention('xla') or set_attention('reference') instead.")


def right_padding(mask):
    """mask bool [B, L] -> (lengths int32 [B], ok bool []): ok iff every row is lengths[b] real tokens then pads."""
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
    expect = jnp.arange(mask.shape[1], dtype=jnp.int32)[None] < lengths[:, None]
    return lengths, jnp.all(mask == expect)


def causal_attention(q, k, v, *, kv_lengths=None, sliding_window: int | None = None, impl: str | None = None):
    """Causal GQA self-attention over one sequence: q [B, L, H, P], k/v [B, L, G, P] -> [B, L, H, P] in q.dtype.

    Query i and key i sit at position i (a stateless call, or a prefill into an empty cache). Key j is visible
    to query i iff j <= i, j < kv_lengths[b] (int [B], right padding; None: every key is real) and, with a
    sliding window (Mistral), i - j < sliding_window: the rule of `attention_mask`. impl (None: ATTN_IMPL):
      "reference"  gqa_attention on that mask.
      "xla"        jax.nn.dot_product_attention(is_causal=True, key_value_seq_lengths=kv_lengths,
                   local_window_size=(sliding_window - 1, 0), implementation="xla"). GQA is native there (head
                   h reads kv group h // (H // G), HF's order), so nothing is repeated. It equals the reference at
                   every position, pads included: a query that sees no key gets the uniform average of all L
                   values in both (finite large negatives, no -inf).
      "cudnn"      the same call with implementation="cudnn" (flash attention: no [L, L] scores in memory, the
                   masked blocks skipped). GPU and bf16/fp16 only: anything else raises one ValueError naming the
                   fix. With kv_lengths the pad queries (i >= kv_lengths[b]) are passed as query_seq_lengths too
                   and come back as zeros (the reference gives them a finite average; no real position reads a
                   pad query's output).
      "auto"       "cudnn" where it can run (a GPU, bf16/fp16 q), "xla" elsewhere.
    An arbitrary boolean mask cannot be given here (these calls cannot express one without materialising it);
    the model falls back to gqa_attention for masks that are not right padding (see models/layers.py).
    """
    impl = ATTN_IMPL if impl is None else _check_impl(impl)
    if impl == "auto":
        impl = "cudnn" if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    b, l, h, p = q.shape
    g = k.shape[2]
    if h % g:
        raise ValueError(f"causal_attention: {h} query heads are not a multiple of {g} kv heads")
    if k.shape[1] != l or v.shape != k.shape:
        raise ValueError(f"causal_attention: q {q.shape}, k {k.shape}, v {v.shape}: k and v need q's length")
    if impl == "reference":
        pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        valid = jnp.ones((b, l), bool) if kv_lengths is None else pos < kv_lengths[:, None]
        return gqa_attention(q, k, v, attention_mask(pos, pos, valid, sliding_window=sliding_window))
    if impl == "cudnn":
        _check_cudnn(q, k, v)
    kw = dict(is_causal=True, implementation=impl)
    if sliding_window is not None:
        kw["local_window_size"] = (int(sliding_window) - 1, 0)  # q - k <= left: HF's q - k < window
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
        kw["key_value_seq_lengths"] = kv_lengths
        if impl == "cudnn":
            kw["query_seq_lengths"] = kv_lengths
    with jax.named_scope(f"causal_attention_{impl}"):
        o = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), **kw)
    if impl == "cudnn" and kv_lengths is not None:
        real = jnp.arange(l, dtype=jnp.int32)[None] < kv_lengths[:, None]               # [B, L]
        o = jnp.where(real[:, :, None, None], o, jnp.zeros((), o.dtype))  # where, not *: no NaN from a pad row
    return o.astype(q.dtype)


# ---- decode against a KV cache: read only the filled part -------------------------------------------------------
# The cached path (`gqa_attention_cached`) is used by Attention for calls of at most DECODE_MAX_QUERIES tokens
# (decode steps, speculative verification); longer calls (prefill) keep the full-cache reference. These are read
# when a model call is traced (`l2m_jax.ops.switches`). The full-cache path stays the default
# until another is measured faster on a GPU (experiments/bench_decode.py --decode-attn pallas,blocked,full).
#   "full"     gqa_attention over the whole cache, masked
#   "blocked"  gqa_attention_cached: an XLA loop over the filled KV blocks, online softmax
#   "pallas"   kernels/pallas_attention.py: the same in one fused kernel, split-K over the sequence (GPU; on a CPU
#              only with interpret=True)
DECODE_IMPLS = ("full", "blocked", "pallas")
DECODE_IMPL = "full"
DECODE_BLOCK = 256             # KV slots per block of the blocked path
DECODE_MAX_QUERIES = 16        # longest call (tokens) that takes the decode path
DECODE_LOOP = "dynamic"        # "dynamic": ceil(max(lengths)/block) trips | "static": S/block trips, see below
DECODE_INTERPRET = False       # "pallas" in Pallas' interpret mode (CPU tests)


def set_decode_attention(impl: str | None = None, *, block: int | None = None, max_queries: int | None = None,
                         loop: str | None = None, interpret: bool | None = None):
    """Switch the cached attention path for programs traced afterwards (`l2m_jax.ops.switches`: the library's
    jitted entry points key their programs on it). block and loop set the "blocked" path's; the "pallas" kernel
    picks its own tiles. interpret: run "pallas" in interpret mode."""
    global DECODE_IMPL, DECODE_BLOCK, DECODE_MAX_QUERIES, DECODE_LOOP, DECODE_INTERPRET
    if interpret is not None:
        DECODE_INTERPRET = bool(interpret)
    if impl is not None:
        if impl not in DECODE_IMPLS:
            raise ValueError(f"decode attention impl {impl!r}: expected one of {', '.join(map(repr, DECODE_IMPLS))}")
        if impl == "pallas" and not DECODE_INTERPRET and jax.default_backend() != "gpu":
            raise ValueError("decode attention impl 'pallas' needs a GPU (Pallas' Triton lowering); on "
                             f"{jax.default_backend()!r} pass interpret=True (slow; for tests) or use 'blocked' or "
                             "'full'")
        DECODE_IMPL = impl
    if block is not None:
        if block < 1:
            raise ValueError(f"decode attention block={block} must be positive")
        DECODE_BLOCK = int(block)
    if max_queries is not None:
        DECODE_MAX_QUERIES = int(max_queries)
    if loop is not None:
        if loop not in ("dynamic", "static"):
            raise ValueError(f"decode attention loop {loop!r}: expected 'dynamic' or 'static'")
        DECODE_LOOP = loop


def gqa_attention_cached(q, k_cache, v_cache, q_positions, lengths, *, block: int = 256,
                         sliding_window: int | None = None, loop: str = "dynamic"):
    """Attention of a few new queries over the filled part of a KV cache (slot = position).

    q [B, T, H, P], k_cache/v_cache [B, S, G, P] (the new keys already written), q_positions int [B, T],
    lengths int [B] (filled slots after this call). Key slot s is visible to the query at position p iff
    s <= p and s < lengths[b] (and p - s < sliding_window when set): the rule of `attention_mask`.

    Loops over blocks of `block` slots with a dynamic trip count ceil(max(lengths) / block) and an online
    (flash-style) softmax in fp32, so slots past the longest row are never read; slots read but not visible
    (the tail of the last block) are masked in both the scores and the values, so whatever they hold
    (stale or NaN) cannot leak in. Equals gqa_attention with the full-cache mask wherever a query sees at
    least one key; a query that sees none (a pad) gives zeros. Returns [B, T, H, P] in q.dtype.

    loop="static" runs ceil(S / block) trips instead (a while loop of known trip count: on GPU no predicate
    goes back to the host per trip); the trips past the longest row re-slice its last block (already read,
    likely in L2) and add nothing, so HBM traffic still stops at the filled part.
    """
    b, t, h, p = q.shape
    s_cap, g = k_cache.shape[1], k_cache.shape[2]
    if h % g:
        raise ValueError(f"gqa_attention_cached: {h} query heads are not a multiple of {g} kv heads")
    if loop not in ("dynamic", "static"):
        raise ValueError(f"gqa_attention_cached: loop={loop!r}, expected 'dynamic' or 'static'")
    r = h // g
    blk = max(1, min(int(block), s_cap))
    lengths = jnp.minimum(lengths.astype(jnp.int32), s_cap)
    q_positions = q_positions.astype(jnp.int32)
    qg = q.reshape(b, t, g, r, p)
    scale = p ** -0.5
    n_needed = (jnp.max(lengths) + blk - 1) // blk  # blocks past the longest row are never read
    last_start = jnp.clip(n_needed - 1, 0, None) * blk
    n_static = -(-s_cap // blk)

    def body(i, carry):
        m, l_sum, acc = carry                       # [B, G, R, T], [B, G, R, T], [B, G, R, T, P] fp32
        lo = i * blk
        start = jnp.minimum(lo, s_cap - blk)         # the last block may be shifted back when blk does not divide S
        if loop == "static":
            start = jnp.minimum(start, last_start)   # trips past the longest row: the last needed block again
        kb = jax.lax.dynamic_slice_in_dim(k_cache, start, blk, axis=1).astype(q.dtype)
        vb = jax.lax.dynamic_slice_in_dim(v_cache, start, blk, axis=1).astype(q.dtype)
        slot = start + jnp.arange(blk, dtype=jnp.int32)                                   # [blk]
        filled = (slot[None, :] >= lo) & (slot[None, :] < lengths[:, None])               # [B, blk], new slots only
        vis = (slot[None, None, :] <= q_positions[:, :, None]) & filled[:, None, :]        # [B, T, blk]
        if sliding_window is not None:
            vis &= (q_positions[:, :, None] - slot[None, None, :]) < sliding_window
        vb = jnp.where(filled[:, :, None, None], vb, jnp.zeros((), vb.dtype))
        sc = jnp.einsum("BTGRP,BSGP->BGRTS", qg, kb, preferred_element_type=jnp.float32) * scale
        vis5 = vis[:, None, None]                                                          # [B, 1, 1, T, blk]
        sc = jnp.where(vis5, sc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)   # a query with nothing visible yet: no NaN from inf-inf
        pw = jnp.where(vis5, jnp.exp(sc - m_safe[..., None]), 0.0)
        corr = jnp.exp(m - m_safe)                            # m = -inf -> 0
        l_sum = l_sum * corr + jnp.sum(pw, axis=-1)
        pv = jnp.einsum("BGRTS,BSGP->BGRTP", pw.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        acc = acc * corr[..., None] + pv
        return m_new, l_sum, acc

    init = (jnp.full((b, g, r, t), -jnp.inf, jnp.float32), jnp.zeros((b, g, r, t), jnp.float32),
            jnp.zeros((b, g, r, t, p), jnp.float32))
    with jax.named_scope("gqa_attention_cached"):
        m, l_sum, acc = jax.lax.fori_loop(0, n_needed if loop == "dynamic" else n_static, body, init)
        o = acc / jnp.where(l_sum > 0, l_sum, 1.0)[..., None]                              # [B, G, R, T, P]
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, t, h, p).astype(q.dtype)


def cached_decode_attention(q, k_cache, v_cache, q_positions, lengths, *, sliding_window: int | None = None):
    """The decode switch's path (DECODE_IMPL "blocked" or "pallas") for a short call into a cache; same arguments
    and result as gqa_attention_cached."""
    if DECODE_IMPL == "pallas":
        from l2m_jax.kernels.pallas_attention import decode_attention

        return decode_attention(q, k_cache, v_cache, q_positions, lengths, sliding_window=sliding_window,
                                interpret=DECODE_INTERPRET)
    return gqa_attention_cached(q, k_cache, v_cache, q_positions, lengths, block=DECODE_BLOCK,
                                sliding_window=sliding_window, loop=DECODE_LOOP)
