"""Training-step speed and memory on the GPU: MFU of a stage-1 distillation step and a full (SFT) step.

    python -m experiments.bench_train                  # 1B-scale shapes + the Llama-3-8B stage-1 fit check
    python -m experiments.bench_train --quick          # tiny shapes: a CPU smoke run of the same code
    python -m experiments.bench_train --attn-impl reference,xla,cudnn --skip-8b   # attention impls side by side
    python -m experiments.bench_train --attn-impl cudnn --ssd xla,pallas --skip-8b   # SSD scans side by side
    python -m experiments.bench_train --shape smollm2 --batch 32,64 --seq 256 --dtype float32 \
        --compute-dtype float32,bfloat16 --no-remat --only stage1 --skip-8b     # the GPU preset's stage-1 step
    python -m experiments.bench_train --shape smollm2 --batch 32 --seq 256 --dtype float32 --compute-dtype \
        bfloat16 --no-remat --only stage1,stage1-cached --skip-8b     # with the teacher's hidden states cached

Stage 1 (MIL_SPEC §2.2): frozen bf16 teacher + a 50% Mamba2 student that shares the teacher's frozen
embeddings, MLPs, norms and attention layers; only the Mamba mixers train (fp32 masters, AdamW), loss
α·CE + β·KL on the same tokens; every layer rematerialised. The full step trains every student parameter (SFT).
Model FLOPs per step: forward = 2·(matmul params)·tokens + causal attention (2·L·H·P per token per attention
layer) + SSD (H·(2QN + 2QP + 4NP) per token per Mamba2 layer); stage 1 = teacher fwd + student fwd + student
input-gradients (≈ its fwd) + weight gradients of the trainable mixers; full = 3 × student fwd.
MFU against the datasheet 989 TFLOP/s (dense bf16) and against the measured 812 TFLOP/s matmul rate.
--attn-impl times the teacher's forward, the stage-1 step and the full step once per full-sequence attention
implementation (l2m_jax.ops.attention.set_attention), each traced afresh; one that cannot run here (cudnn without
a GPU) gets a row saying why. --ssd does the same for the Mamba-2 mixers' full-sequence scan
(l2m_jax.ops.ssm.set_ssd_backend: "xla" or the fused Pallas kernels, forward and backward), for every attention
implementation. Peak memory is the process's peak so far, so it only grows down the table.
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from l2m_jax.config import ModelConfig, default_ssm_config
from l2m_jax.convert.hybridize import attention_layers_for
from l2m_jax.models import bind, forward, init_params
from l2m_jax.ops.attention import ATTN_IMPLS, attention_impl
from l2m_jax.ops.ssm import ssd_backend
from l2m_jax.train.losses import sft_loss
from l2m_jax.train.optim import make_optimizer, merge, split_trainable, trainable_mask
from l2m_jax.train.stages import (COMPUTE_DTYPES, TEACHER_HIDDEN, computing_in, distill_loss_fn,
                                  teacher_hidden_states)

PEAK, MEASURED = 989.4e12, 812e12


SHAPES = ("1b", "smollm2", "tiny", "8b")


def shapes(name: str, dtype: str = "bfloat16") -> ModelConfig:
    kw = dict(dtype=dtype, param_dtype=dtype)
    if name == "smollm2":  # SmolLM2-135M-Instruct, the recipe's teacher
        return ModelConfig.smollm2_135m(**kw)
    if name == "tiny":
        return ModelConfig.tiny(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                                ffn_dim=256, **kw)
    if name == "1b":  # Llama-3.2-1B shapes
        return ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                           ffn_dim=8192, rope_theta=500000.0, max_position_embeddings=8192, tie_embeddings=True,
                           **kw)
    if name == "8b":
        return ModelConfig.llama3_8b()
    raise ValueError(name)


def student_cfg(t: ModelConfig) -> ModelConfig:
    keep = attention_layers_for(t.n_layers, 0.5)
    return t.replace(layer_mixers=tuple("attention" if i in keep else "mamba2" for i in range(t.n_layers)),
                     ssm=default_ssm_config(t, "mamba2"))


def matmul_params(cfg: ModelConfig, params) -> int:
    """Parameters that take part in a matmul per token (everything but the embedding lookup and vectors)."""
    n = sum(x.size for x in jax.tree.leaves(params["layers"]) if x.ndim == 2)
    n += cfg.vocab_size * cfg.d_model  # lm_head (tied or not)
    return int(n)


def forward_flops(cfg: ModelConfig, params, tokens: int, seq: int) -> float:
    f = 2.0 * matmul_params(cfg, params) * tokens
    f += len(cfg.attn_layers) * 2.0 * seq * cfg.q_dim * tokens            # QK^T and PV, causal half
    if cfg.ssm_layers:
        s, q = cfg.ssm, min(cfg.ssm.chunk_size, seq)
        f += len(cfg.ssm_layers) * s.n_heads * (2 * q * s.d_state + 2 * q * s.head_dim
                                                 + 4 * s.d_state * s.head_dim) * tokens
    return f


def random_params(cfg: ModelConfig, key) -> dict:
    """Random weights for a bench, drawn by one jitted program on the host's CPU and then put on the default
    device: their values never matter for timing. On the H100 the first stage-1 configuration, which drew its
    weights on the GPU, took 245 s beyond its step's compile (BENCHMARKS.md); on the CPU the two draws compile
    in about 13 s each and a 135M-parameter draw runs in 0.7 s on 2 cores."""
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        params = jax.jit(init_params, static_argnums=0)(cfg, jax.device_put(key, cpu))
    return jax.device_put(params, jax.devices()[0])


def stage1_setup(t_cfg, s_cfg, key):
    """Teacher params (t_cfg's dtype) and a student sharing every frozen leaf with it; trainable mixers in fp32."""
    t_params = random_params(t_cfg, key)
    fresh = random_params(s_cfg.replace(param_dtype="float32"), jax.random.fold_in(key, 1))
    layers = {i: (dict(t_params["layers"][i], mixer=fresh["layers"][i]["mixer"]) if m != "attention"
                  else t_params["layers"][i]) for i, m in enumerate(s_cfg.layer_mixers)}
    del fresh
    return t_params, dict(t_params, layers=layers)


def time_steps(step, state, args, reps):
    """(median seconds of step(state, *args) -> (state, metric) over `reps` calls after a warm-up, the metric,
    seconds to lower and compile the jitted `step`): compilation is timed on its own, not inside the warm-up."""
    t = time.perf_counter()
    step = step.lower(state, *args).compile()
    compile_s = time.perf_counter() - t
    state, m = step(state, *args)                     # warm-up
    jax.block_until_ready(m)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        state, m = step(state, *args)
        jax.block_until_ready(m)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), m, compile_s


def stage1_step(t_cfg, s_cfg, opt, *, remat=True, compute_dtype=None, teacher_cached=False):
    """step((train, opt_state), frozen, teacher, tokens) -> ((train, opt_state), loss).

    Every array is an argument: the trainable mixers and their moments (donated), the student's frozen
    leaves and the frozen teacher (not donated; they share buffers). Nothing is closed over, so jit never
    bakes parameters into the program as constants (at 8B shapes that was 16 GB of them).
    compute_dtype: both models compute in it (`stages.computing_in`, the recipe's compute_dtype).
    teacher_cached: `tokens` is (tokens, the teacher's hidden states [B, L, D]), and the teacher runs only its
    head (the recipe's stage1.teacher_cache)."""
    stage1 = distill_loss_fn(computing_in(s_cfg, compute_dtype), computing_in(t_cfg, compute_dtype), alpha=1.0,
                             beta=0.1, remat=remat, teacher_cached=teacher_cached)

    def loss_fn(train, frozen, teacher, tokens):
        batch = {"tokens": tokens[0], TEACHER_HIDDEN: tokens[1]} if teacher_cached else {"tokens": tokens}
        return stage1({"student": merge(train, frozen), "teacher": teacher}, batch, None)

    def step(state, frozen, teacher, tokens):
        train, opt_state = state
        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(train, frozen, teacher, tokens)
        upd, opt_state = opt.update(g, opt_state, train)
        return (jax.tree.map(lambda p, u: p + u, train, upd), opt_state), m["loss"]
    return step


def stage1_opt():
    return make_optimizer(lr=8e-5, betas=(0.9, 0.98), clip_norm=0.1, warmup_steps=10, total_steps=1000)


def bench_stage1(t_cfg, s_cfg, batch, seq, reps, key, *, remat=True, compute_dtype=None, teacher_cached=False):
    started = time.perf_counter()
    t_params, s_params = stage1_setup(t_cfg, s_cfg, key)
    jax.block_until_ready((t_params, s_params))
    setup_s = time.perf_counter() - started      # drawing the random weights (`random_params`)
    mask = trainable_mask(s_params, s_cfg, "stage1")
    train, frozen = split_trainable(s_params, mask)
    opt = stage1_opt()
    opt_state = opt.init(train)
    tokens = jax.random.randint(key, (batch, seq), 0, t_cfg.vocab_size, jnp.int32)
    if teacher_cached:   # what the cache holds: the teacher's hidden states of these rows, in the compute dtype
        tokens = (tokens, teacher_hidden_states((t_cfg, t_params), np.asarray(tokens), batch_size=batch,
                                                compute_dtype=compute_dtype))
    n_train = sum(x.size for x in jax.tree.leaves(train) if x.ndim == 2)
    step = jax.jit(stage1_step(t_cfg, s_cfg, opt, remat=remat, compute_dtype=compute_dtype,
                               teacher_cached=teacher_cached), donate_argnums=(0,))
    t, loss, compile_s = time_steps(step, (train, opt_state), (frozen, t_params, tokens), reps)
    n_tok = batch * seq
    # the model FLOPs of the step without the cache, so that tokens/s and MFU compare across the two
    flops = (forward_flops(t_cfg, t_params, n_tok, seq) + 2 * forward_flops(s_cfg, s_params, n_tok, seq)
             + 2.0 * n_train * n_tok)
    return dict(step="stage1, teacher cached" if teacher_cached else "stage1", tokens=n_tok, s=t,
                tok_per_s=n_tok / t, tflops=flops / t / 1e12, mfu=flops / t / PEAK, mfu_measured=flops / t / MEASURED,
                loss=float(loss), compile_s=compile_s, setup_s=setup_s)


def full_step(cfg32, opt, *, remat=True):
    """step((params, opt_state), tokens, mask) -> ((params, opt_state), loss); every array an argument."""
    def step(state, tokens, mask):
        params, opt_state = state
        (loss, _), g = jax.value_and_grad(
            lambda p: sft_loss(bind(cfg32, p)(tokens, remat=remat)[0], tokens, mask), has_aux=True)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return (jax.tree.map(lambda p, u: p + u, params, upd), opt_state), loss
    return step


def bench_full(s_cfg, batch, seq, reps, key, *, remat=True, compute_dtype=None):
    cfg32 = computing_in(s_cfg, compute_dtype).replace(param_dtype="float32")
    params = random_params(cfg32, key)
    opt = make_optimizer(lr=2e-5, total_steps=1000, warmup_steps=10)
    opt_state = opt.init(params)
    tokens = jax.random.randint(key, (batch, seq), 0, s_cfg.vocab_size, jnp.int32)
    mask = jnp.ones((batch, seq), bool)
    t, loss, compile_s = time_steps(jax.jit(full_step(cfg32, opt, remat=remat), donate_argnums=(0,)), (params, opt_state),
                         (tokens, mask), reps)
    n_tok = batch * seq
    flops = 3 * forward_flops(s_cfg, params, n_tok, seq)
    return dict(step="full (SFT)", tokens=n_tok, s=t, tok_per_s=n_tok / t, tflops=flops / t / 1e12,
                mfu=flops / t / PEAK, mfu_measured=flops / t / MEASURED, loss=float(loss), compile_s=compile_s)


def bench_forward(t_cfg, batch, seq, reps, key, *, remat=True, compute_dtype=None):
    """The teacher's full-sequence forward (no remat): the call where attention is the largest share."""
    params = random_params(t_cfg, key)
    tokens = jax.random.randint(key, (batch, seq), 0, t_cfg.vocab_size, jnp.int32)
    fwd = functools.partial(forward, computing_in(t_cfg, compute_dtype), checked=False)
    step = jax.jit(lambda state, tokens: (state, fwd(state, tokens)[0][:, -1]))   # a [B, V] slice to wait on
    t, _, compile_s = time_steps(step, params, (tokens,), reps)
    n_tok = batch * seq
    flops = forward_flops(t_cfg, params, n_tok, seq)
    return dict(step="teacher forward", tokens=n_tok, s=t, tok_per_s=n_tok / t, tflops=flops / t / 1e12,
                mfu=flops / t / PEAK, mfu_measured=flops / t / MEASURED, loss=float("nan"), compile_s=compile_s)


def attn_impls(text: str) -> list[str]:
    impls = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in impls if x not in ATTN_IMPLS]
    if bad or not impls:
        raise argparse.ArgumentTypeError(f"--attn-impl {text!r}: a comma-separated list of {', '.join(ATTN_IMPLS)}")
    return impls


def ssd_backends(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or any(x not in ("xla", "pallas") for x in names):
        raise argparse.ArgumentTypeError(f"--ssd {text!r}: a comma-separated list of xla, pallas")
    return names


def int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of positive integers")
    return out


def name_list(choices):
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        if not names or any(x not in choices for x in names):
            raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(choices)}")
        return names
    return parse


STEPS = ("forward", "stage1", "stage1-cached", "full")


def peak_gb():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny shapes (--shape tiny, batch 2 x 64): a CPU smoke run")
    ap.add_argument("--shape", choices=SHAPES[:2], default="1b",
                    help="the teacher: Llama-3.2-1B shapes (random bf16) or SmolLM2-135M's (the recipe's teacher)")
    ap.add_argument("--dtype", choices=COMPUTE_DTYPES, default="bfloat16", help="the teacher's parameters")
    ap.add_argument("--compute-dtype", type=name_list(("model",) + COMPUTE_DTYPES), default=["model"],
                    help="the training computation's dtypes to time side by side (mixed precision, the recipe's "
                         "compute_dtype); 'model': the parameters' own")
    ap.add_argument("--no-remat", action="store_true", help="keep activations (the recipe's stages do)")
    ap.add_argument("--only", type=name_list(STEPS), default=list(STEPS), help="which steps to time")
    ap.add_argument("--batch", type=int_list, default=[8], help="rows per step; a list times each")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--only-8b", action="store_true", help="just the Llama-3-8B stage-1 fit check")
    ap.add_argument("--attn-impl", type=attn_impls, default=["reference"],
                    help="full-sequence attention implementations to time side by side, comma-separated "
                         f"({','.join(ATTN_IMPLS)}); the 8B fit check uses the first")
    ap.add_argument("--ssd", type=ssd_backends, default=["xla"],
                    help="the Mamba-2 mixers' full-sequence scans to time side by side (xla,pallas); the 8B fit "
                         "check uses the first")
    a = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}", flush=True)
    key = jax.random.key(0)
    t_cfg = shapes("tiny" if a.quick else a.shape, a.dtype)
    s_cfg = student_cfg(t_cfg)
    batches, seq = ([2], 64) if a.quick else (a.batch, a.seq)
    benches = {"forward": lambda t, s, *args, **kw: bench_forward(t, *args, **kw), "stage1": bench_stage1,
               "stage1-cached": functools.partial(bench_stage1, teacher_cached=True),
               "full": lambda t, s, *args, **kw: bench_full(s, *args, **kw)}
    remat = not a.no_remat
    rows = []
    runs = [(i, x, b, d) for i in a.attn_impl for x in a.ssd for b in batches for d in a.compute_dtype]
    for impl, scan, batch, dt in [] if a.only_8b else runs:
        compute = None if dt == "model" else dt
        with attention_impl(impl), ssd_backend(scan, interpret=a.quick and scan == "pallas"):
            for name in a.only:
                print(f"timing {name}: attention {impl}, ssd {scan}, batch {batch} x {seq}, compute {dt} ...",
                      flush=True)
                started = time.perf_counter()
                try:
                    r = dict(benches[name](t_cfg, s_cfg, batch, seq, a.reps, key, remat=remat, compute_dtype=compute),
                             attn=impl, ssd=scan, compute=compute or t_cfg.dtype, peak=peak_gb())
                except Exception as e:  # an implementation this machine cannot run: say so, time the others
                    if impl == "reference" and scan == "xla":
                        raise
                    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    print(f"attention {impl}, ssd {scan}: skipped ({why})", flush=True)
                    rows.append(dict(attn=impl, ssd=scan, compute=compute or t_cfg.dtype, skipped=why))
                    break
                r["wall_s"] = time.perf_counter() - started
                print(r, flush=True)
                rows.append(r)
    shape = "tiny" if a.quick else {"1b": "1B (Llama-3.2-1B)", "smollm2": "SmolLM2-135M"}[a.shape]
    print(f"\nparameters {t_cfg.param_dtype}, remat {'on' if remat else 'off'}, {seq} tokens per row")
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(none)'}")
    print("| step | attention | ssd | compute | shapes | tokens/step | s/step | tokens/s | TFLOP/s | MFU (989) | "
          "MFU (812 measured) | peak GB | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| all | {r['attn']} | {r['ssd']} | {r['compute']} | {shape} | skipped: {r['skipped']} ||||||||")
            continue
        model = shape + ("" if r["step"] == "teacher forward" else " 50% Mamba2")
        print(f"| {r['step']} | {r['attn']} | {r['ssd']} | {r['compute']} | {model} | {r['tokens']} | "
              f"{r['s']:.4f} | {r['tok_per_s']:.0f} | {r['tflops']:.0f} | {r['mfu']:.1%} | "
              f"{r['mfu_measured']:.1%} | {r['peak']:.1f} | {r['compile_s']:.1f} |")
    if not a.quick and not a.skip_8b:
        t8 = shapes("8b")
        with attention_impl(a.attn_impl[0]), ssd_backend(a.ssd[0]):
            r = bench_stage1(t8, student_cfg(t8), 1, 2048, 2, key)
        print(f"\nLlama-3-8B shapes stage-1 step (bf16 teacher + 50% Mamba2 student, MLPs frozen, remat, 1x2048, "
              f"attention {a.attn_impl[0]}): {r['s']:.2f} s/step, {r['tok_per_s']:.0f} tok/s, MFU {r['mfu']:.1%}, "
              f"peak memory {peak_gb():.1f} GB of {(dev.memory_stats() or {}).get('bytes_limit', 0) / 1e9:.0f} GB",
              flush=True)


if __name__ == "__main__":
    main()
