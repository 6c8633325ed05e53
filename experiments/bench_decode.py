"""Decode speed on the GPU: tokens/s and HBM-roofline fraction, decode-state size, speculative decoding.

    python -m experiments.bench_decode                 # 8B shapes, random bf16 weights
    python -m experiments.bench_decode --quick         # tiny shapes: a CPU smoke run of the same code
    python -m experiments.bench_decode --decode-attn blocked,full --extra-capacity 7168   # KV read: filled vs all
    python -m experiments.bench_decode --models hybrid50-mamba2 --decode-attn pallas,full --draft-layers 4,30 \
        --spec 4:pallas,4:pallas-matrix,4:triton     # the hybrid only: fused attention decode, drafts, verifiers

(a) plain decoding at batch 1 and 32: all-attention vs 50% Mamba2 hybrid vs pure Mamba2 at Llama-3-8B shapes;
    minimal bytes per step = weights + KV of the current context + SSM state read and written; fraction of a
    4.19 TB/s roofline; decode-state bytes per sequence at 4k context and the largest batch that fits.
(b) one speculative round (K drafts + one K+1-token verification, acceptance, bookkeeping) vs one plain step,
    timed inside the jitted speculative loop, for SmolLM2-width drafts of --draft-layers layers (random weights;
    each draft's own decode step is timed too); the speedup it gives at an acceptance rate α is
    E[tokens per round] · t_step / t_round with E = (1 − α^(K+1)) / (1 − α).
Real weights end to end (the distilled SmolLM2 hybrid and its distilled drafts: wall-clock tokens/s of plain
against speculative decoding, measured acceptance) are timed by `experiments.train_draft --speed 1,8`.
Times are medians of repeated runs after a warm-up, with block_until_ready.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from l2m_jax.cache import init_state, state_bytes_per_sequence
from l2m_jax.config import ModelConfig, default_ssm_config
from l2m_jax.convert.hybridize import attention_layers_for
from l2m_jax.infer.speculative import _speculate
from l2m_jax.kernels import pallas_ssm
from l2m_jax.models import bind, init_params
from l2m_jax.ops import attention as attn_ops
from l2m_jax.ops import switches
from l2m_jax.ops.sampling import GREEDY

HBM = 4.19e12  # B/s, measured copy bandwidth of the H200 (read + write)


def median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def models_8b(quick: bool):
    base = ModelConfig.tiny(vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
                            ffn_dim=512, dtype="bfloat16", param_dtype="bfloat16") if quick \
        else ModelConfig.llama3_8b()
    n = base.n_layers
    out = {"attention": (base, None)}
    for name, frac in (("hybrid50-mamba2", 0.5), ("mamba2", 0.0)):
        out[name] = (base, attention_layers_for(n, frac))
    return out


def build(base: ModelConfig, attn_layers, key):
    """Random parameters, created on the device inside one jit (no host round trip)."""
    cfg = base
    if attn_layers is not None:
        cfg = base.replace(layer_mixers=tuple("attention" if i in attn_layers else "mamba2"
                                              for i in range(base.n_layers)),
                           ssm=default_ssm_config(base, "mamba2"))
    params = jax.jit(init_params, static_argnums=0)(cfg, key)
    return cfg, params


def random_state(cfg, batch, capacity, context, key):
    """A decode state at `context` tokens filled with random values (never time on zeros)."""
    st = init_state(cfg, batch, capacity)
    layers = []
    for i, c in enumerate(st.layers):
        k = jax.random.fold_in(key, i)
        layers.append(jax.tree.map(lambda a: (jax.random.normal(k, a.shape, jnp.float32) * 0.5).astype(a.dtype), c))
    return st._replace(layers=tuple(layers), lengths=jnp.full((batch,), context, jnp.int32))


def decode_loop(cfg, n_steps: int, backend: str):
    def run(params, state, tok):
        model = bind(cfg, params)

        def body(_, c):
            state, tok = c
            logits, state = model(tok[:, None], state=state, backend=backend)
            return state, jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
        return jax.lax.fori_loop(0, n_steps, body, (state, tok))
    return jax.jit(run, donate_argnums=(1,))


def min_bytes_per_step(cfg, params, batch, context) -> int:
    """Weights once, KV of `context` tokens, SSM state read + written, conv state read + written."""
    b = tree_bytes(params)
    per = state_bytes_per_sequence(cfg, context)
    return b + batch * (per["kv"] + 2 * per["ssm"] + 2 * per["conv"])


def bench_plain(name, cfg, params, batch, context, n_steps, reps, backend, key, extra_capacity=0):
    capacity = context + n_steps * (reps + 2) + 16 + extra_capacity
    state = random_state(cfg, batch, capacity, context, key)
    tok = jax.random.randint(key, (batch,), 0, cfg.vocab_size, jnp.int32)
    run = decode_loop(cfg, n_steps, backend)
    holder = {"s": state}

    def once():
        holder["s"], t = run(params, holder["s"], tok)
        return t
    t = median_time(once, reps) / n_steps
    mid_ctx = context + n_steps * (reps + 1) // 2
    bytes_ = min_bytes_per_step(cfg, params, batch, mid_ctx)
    return dict(model=name, batch=batch, context=context, capacity=capacity, backend=backend,
                attn=attn_ops.DECODE_IMPL, ms_per_step=t * 1e3,
                tokens_per_s=batch / t, gb_per_step=bytes_ / 1e9, roofline=bytes_ / t / HBM)


def capacity_table(name, cfg, params, hbm_bytes: float):
    per = state_bytes_per_sequence(cfg, 4096)
    free = hbm_bytes - tree_bytes(params)
    return dict(model=name, kv_mb=per["kv"] / 2**20, ssm_mb=per["ssm"] / 2**20, conv_mb=per["conv"] / 2**20,
                total_mb=per["total"] / 2**20, max_batch_4k=int(free // per["total"]))


def bench_spec_round(t_cfg, t_params, d_cfg, d_params, k, max_new, reps, backend, key):
    """Wall time of the jitted speculative loop divided by its rounds (batch 1)."""
    prompt = jax.random.randint(key, (1, 64), 0, t_cfg.vocab_size, jnp.int32)
    lens = jnp.array([64], jnp.int32)
    cap = 64 + max_new + k + 16

    with pallas_ssm.backend_form(backend) as kernel:      # "pallas-matrix": the pallas kernels in that form

        def once():
            return _speculate(t_params, d_params, prompt, lens, key, t_cfg=t_cfg, d_cfg=d_cfg, k=k, sampling=GREEDY,
                              max_new=max_new, eos_id=None, capacity=cap, backend=kernel, switches=switches())
        t = median_time(once, reps)
        calls = int(once()[2])
    return t / calls, calls


def expected_tokens(alpha: float, k: int) -> float:
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def md_table(rows, cols):
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--backends", default="xla", help="comma list of SSM kernel back-ends for decode steps")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--spec", default="4:xla,4:triton,2:triton,6:triton",
                    help="comma list of K:backend speculative settings to time (backend pallas-matrix / "
                         "pallas-unrolled: the pallas kernels in that form of pallas_ssm.set_form)")
    ap.add_argument("--alphas", default="0.6,0.7,0.8,0.9", help="acceptance rates to evaluate the speedup at")
    ap.add_argument("--decode-attn", default="blocked",
                    help="comma list of cached-attention paths for plain decoding: pallas (one fused kernel over the "
                         "filled KV slots, split-K), blocked (an XLA loop over the filled slots), full (the whole "
                         "cache, masked); the first one is used for (b)")
    ap.add_argument("--decode-block", type=int, default=None, help="KV slots per block of the blocked path")
    ap.add_argument("--decode-loop", default=None, choices=["dynamic", "static"],
                    help="blocked path: trip count ceil(len/block) (dynamic) or S/block (static)")
    ap.add_argument("--extra-capacity", type=int, default=0,
                    help="KV slots preallocated beyond what the plain run needs (a long-context server's cache)")
    ap.add_argument("--draft-layers", default="30",
                    help="comma list of draft depths for (b): SmolLM2's width with this many layers (30: SmolLM2 "
                         "itself; the distilled drafts of experiments.train_draft have 2-6)")
    ap.add_argument("--models", default="",
                    help="comma subset of the 8B-shape models for (a) (the 50%% hybrid is always run: (b) needs it)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    key = jax.random.key(0)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}", flush=True)
    hbm = (dev.memory_stats() or {}).get("bytes_limit", 141e9) if dev.platform == "gpu" else 141e9
    backends = a.backends.split(",")
    spec = [(int(x.split(":")[0]), x.split(":")[1]) for x in a.spec.split(",")]
    alphas = [float(x) for x in a.alphas.split(",")]
    results = {"plain": [], "capacity": [], "spec": [], "draft": []}
    draft_layers = [int(n) for n in a.draft_layers.split(",")]
    attn_impls = a.decode_attn.split(",")
    attn_ops.set_decode_attention(attn_impls[0], block=a.decode_block, loop=a.decode_loop)
    print(f"cached attention: {attn_impls} block={attn_ops.DECODE_BLOCK} loop={attn_ops.DECODE_LOOP}", flush=True)

    models = {}
    wanted = set(a.models.split(",")) | {"hybrid50-mamba2"} if a.models else None
    for name, (base, attn) in models_8b(a.quick).items():
        if wanted is not None and name not in wanted:
            continue
        cfg, params = build(base, attn, jax.random.fold_in(key, len(models)))
        models[name] = (cfg, params)
        results["capacity"].append(capacity_table(name, cfg, params, hbm))
        for batch in (1, 32):
            for backend in backends if cfg.ssm_layers else ["xla"]:
                for impl in attn_impls if cfg.attn_layers else attn_impls[:1]:
                    attn_ops.set_decode_attention(impl)  # read when decode_loop's fresh jit traces
                    r = bench_plain(name, cfg, params, batch, a.context, a.steps, a.reps, backend, key,
                                    a.extra_capacity)
                    results["plain"].append(r)
                    print(r, flush=True)
                attn_ops.set_decode_attention(attn_impls[0])
        if name != "hybrid50-mamba2":
            del models[name], params

    # (b) speculative rounds with the 8B-shape hybrid target and SmolLM2-width drafts of the same vocab
    t_cfg, t_params = models["hybrid50-mamba2"]
    step = next(r for r in results["plain"] if r["model"] == "hybrid50-mamba2" and r["batch"] == 1
                and r["attn"] == attn_impls[0])
    for n_layers in draft_layers:
        d_base = ModelConfig.smollm2_135m(vocab_size=t_cfg.vocab_size, n_layers=n_layers, dtype="bfloat16",
                                          param_dtype="bfloat16")
        if a.quick:
            d_base = ModelConfig.tiny(vocab_size=t_cfg.vocab_size, d_model=64, n_layers=min(n_layers, 2),
                                      dtype="bfloat16", param_dtype="bfloat16")
        d_cfg, d_params = build(d_base, None, jax.random.fold_in(key, 99 + n_layers))
        # the draft's own decode step (batch 1): what K of them add to a round
        d_step = bench_plain(f"draft-{n_layers}", d_cfg, d_params, 1, 64, a.steps, a.reps, "xla", key)
        results["draft"].append(d_step)
        print(d_step, flush=True)
        for k, backend in spec:
            t_round, calls = bench_spec_round(t_cfg, t_params, d_cfg, d_params, k, 8 * (k + 1), a.reps, backend,
                                              key)
            for alpha in alphas:
                e = expected_tokens(alpha, k)
                results["spec"].append(dict(k=k, backend=backend, draft_layers=n_layers, alpha=alpha,
                                            ms_round=t_round * 1e3, draft_ms_step=d_step["ms_per_step"],
                                            round_over_step=t_round / (step["ms_per_step"] / 1e3),
                                            tokens_per_round=e, speedup=e * (step["ms_per_step"] / 1e3) / t_round))
            print(results["spec"][-1], flush=True)

    print("\n## (a) plain decoding (minimal bytes: weights + KV at context + SSM/conv state r/w)")
    print(md_table(results["plain"], ["model", "batch", "backend", "attn", "capacity", "ms_per_step",
                                      "tokens_per_s", "gb_per_step", "roofline"]))
    print("\n## decode state per sequence at 4k context (MiB) and the largest batch that fits")
    print(md_table(results["capacity"], ["model", "kv_mb", "ssm_mb", "conv_mb", "total_mb", "max_batch_4k"]))
    print("\n## (b) speculative round vs one plain step, 50% hybrid target, SmolLM2-width drafts, batch 1")
    print(md_table(results["spec"], ["k", "backend", "draft_layers", "draft_ms_step", "alpha", "ms_round",
                                     "round_over_step", "tokens_per_round", "speedup"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
