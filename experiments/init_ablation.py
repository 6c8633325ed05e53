"""MiL's initialisation ablation on the real SmolLM2 teacher: attention-initialised vs randomly-initialised Mamba
layers, held-out perplexity before and after the same short stage-1 distillation.

    python -m experiments.init_ablation [--mixer mamba2] [--steps 60] [--seq 128] [--batch 4]

Stage 1 as in MIL_SPEC §2.2: only the Mamba mixers train (AdamW β=(0.9, 0.98), lr 8e-5 → here `--lr`,
clip 0.1), loss α·CE + β·KL against the frozen teacher's logits on the same tokens (α=1, β=0.1, token-mean
KL). Training text: ChatterBot conversations in the teacher's chat template (never the held-out prose).
Perplexity: the bundled Jane Austen excerpt (`l2m_jax.assets.heldout_text`).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import l2m_jax
from l2m_jax import assets
from l2m_jax.convert.hybridize import attention_layers_for, hybridize
from l2m_jax.data.chat import render_chat
from l2m_jax.data.chatterbot import chatterbot_rows
from l2m_jax.eval.perplexity import perplexity
from l2m_jax.train.optim import make_optimizer, merge, split_trainable, trainable_mask
from l2m_jax.train.stages import distill_loss_fn


def training_rows(tokenizer, seq: int) -> np.ndarray:
    """ChatterBot conversations, chat-templated, concatenated and cut into rows of `seq` tokens."""
    ids = []
    for row in chatterbot_rows():
        ids += tokenizer.encode(render_chat(tokenizer, row["messages"], add_generation_prompt=False))
    n = len(ids) // seq
    return np.asarray(ids[:n * seq], np.int32).reshape(n, seq)


def distil(t_cfg, t_params, s_cfg, s_params, rows, *, steps, batch, lr, seed):
    mask = trainable_mask(s_params, s_cfg, "stage1")
    train, frozen = split_trainable(s_params, mask)
    opt = make_optimizer(lr=lr, betas=(0.9, 0.98), clip_norm=0.1, warmup_steps=max(1, steps // 10),
                         total_steps=steps)
    opt_state = opt.init(train)

    stage1 = distill_loss_fn(s_cfg, t_cfg, alpha=1.0, beta=0.1)

    def loss_fn(train, tokens):
        return stage1({"student": merge(train, frozen), "teacher": t_params}, {"tokens": tokens}, None)

    @jax.jit
    def step(train, opt_state, tokens):
        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(train, tokens)
        upd, opt_state = opt.update(g, opt_state, train)
        return jax.tree.map(lambda p, u: p + u, train, upd), opt_state, m

    order = np.random.default_rng(seed).permutation(len(rows))
    t0, log = time.time(), []
    for i in range(steps):
        idx = order[(i * batch) % len(order):][:batch]
        train, opt_state, m = step(train, opt_state, jnp.asarray(rows[idx]))
        log.append((float(m["ce"]), float(m["kl"])))
        if i % 10 == 0 or i == steps - 1:
            print(f"  step {i:4d}  ce {log[-1][0]:.3f}  kl {log[-1][1]:.3f}  ({time.time() - t0:.0f} s)", flush=True)
    return merge(train, frozen), log


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mixer", default="mamba2", choices=["mamba", "mamba2"])
    ap.add_argument("--attn-fraction", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t_cfg, t_params = l2m_jax.load("smollm2")
    tok = l2m_jax.load_tokenizer("smollm2")
    held = tok.encode(assets.heldout_text())
    rows = training_rows(tok, a.seq)
    keep = attention_layers_for(t_cfg.n_layers, a.attn_fraction)
    n, t_ppl = perplexity(t_cfg, t_params, held, max_tokens=a.eval_tokens)
    print(f"teacher ppl {t_ppl:.2f} on {n} held-out tokens; {len(rows)} training rows of {a.seq} tokens", flush=True)
    results = []
    for init in ("attention", "random"):
        s_cfg, s_params = hybridize(t_cfg, t_params, keep, a.mixer, jax.random.key(a.seed), init=init)
        before = perplexity(s_cfg, s_params, held, max_tokens=a.eval_tokens)[1]
        print(f"{init}-initialised {s_cfg.pattern}: ppl before {before:.1f}", flush=True)
        s_params, log = distil(t_cfg, t_params, s_cfg, s_params, rows, steps=a.steps, batch=a.batch, lr=a.lr,
                               seed=a.seed)
        after = perplexity(s_cfg, s_params, held, max_tokens=a.eval_tokens)[1]
        results.append((init, before, after, log[-1]))
        print(f"{init}-initialised: ppl after {a.steps} steps {after:.2f}", flush=True)
    print(f"\n| init | ppl before | ppl after {a.steps} stage-1 steps | ratio to teacher ({t_ppl:.2f}) | final CE | final KL |")
    print("|---|---|---|---|---|---|")
    for init, before, after, (ce, kl) in results:
        print(f"| {init} | {before:.1f} | {after:.2f} | {after / t_ppl:.2f} | {ce:.3f} | {kl:.3f} |")


if __name__ == "__main__":
    main()
