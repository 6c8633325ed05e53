"""A SmolLM2-derived draft for speculative decoding, distilled from the teacher, and its measured acceptance.

    python -m experiments.train_draft [--layers 0,1,2,3,4,5,6,7] [--steps 150] [--k 4]

Draft: the teacher's embeddings, head and a subset of its layers (`l2m_jax.infer.speculative.shrink`),
then end-to-end KD (every draft parameter trains, KL(teacher ‖ draft) token mean + CE) on chat-templated
ChatterBot conversations. Acceptance is measured with greedy speculative decoding (target = the teacher)
on ChatterBot prompts held out from the draft's training conversations, before and after training.
With the GPU-measured cost of one K=4 round (BENCHMARKS.md: 2.01 plain 8B-hybrid steps) it prints the speedup
that acceptance gives at 8B shapes: E[tokens per round] / 2.01.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import l2m_jax
from l2m_jax.data.chat import encode_chat_prompt, render_chat
from l2m_jax.data.chatterbot import chatterbot_rows
from l2m_jax.data.packing import pack_sequences
from l2m_jax.infer.speculative import shrink
from l2m_jax.train.optim import StagePreset
from l2m_jax.train.stages import StageSettings, distill_stage

ROUND_OVER_STEP_8B = 2.01  # measured: one K=4 round / one plain step, 8B-shape 50% hybrid (BENCHMARKS.md)


def split_conversations(rows, eval_every: int = 10):
    """Every `eval_every`-th conversation is held out: its first user turn becomes an evaluation prompt."""
    train = [r for i, r in enumerate(rows) if i % eval_every]
    held = [r["messages"][0]["content"] for i, r in enumerate(rows) if not i % eval_every]
    return train, held


def acceptance(teacher, draft, prompts, k, max_new):
    _, stats = l2m_jax.speculative_generate(teacher, draft, prompts, max_new, k=k, eos_id=teacher[0].eos_token_id)
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0,1,2,3,4,5,6,7")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=24)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--out", default=None, help="save the trained draft here (l2m format)")
    a = ap.parse_args(argv)

    t_cfg, t_params = l2m_jax.load("smollm2")
    tok = l2m_jax.load_tokenizer("smollm2")
    train_rows, held = split_conversations(chatterbot_rows())
    examples = []
    for r in train_rows:
        ids = tok.encode(render_chat(tok, r["messages"], add_generation_prompt=False), add_special_tokens=False)
        examples.append((ids, np.ones(len(ids), bool)))
    data, stats = pack_sequences(examples, a.seq, t_cfg.pad_token_id or 0, drop_last=True)
    prompts = [list(encode_chat_prompt(tok, [{"role": "user", "content": q}])) for q in held[:a.eval_prompts]]
    layers = [int(x) for x in a.layers.split(",")]
    d_cfg, d_params = shrink(t_cfg, t_params, layers)
    print(f"draft: layers {layers} of {t_cfg.n_layers}; {len(data['tokens'])} training rows of {a.seq} tokens; "
          f"{len(prompts)} held-out prompts", flush=True)

    before = acceptance((t_cfg, t_params), (d_cfg, d_params), prompts, a.k, a.max_new)
    print(f"before training: acceptance {before.acceptance_rate:.3f}, tokens/round {before.tokens_per_call:.2f}",
          flush=True)
    preset = StagePreset(lr=a.lr, betas=(0.9, 0.999), clip_norm=1.0, warmup_steps=max(1, a.steps // 10),
                         ce_weight=1.0, kl_weight=1.0)
    t0 = time.time()
    result = distill_stage((d_cfg, d_params), (t_cfg, t_params),
                           {"tokens": data["tokens"], "loss_mask": data["loss_mask"]},
                           StageSettings(steps=a.steps, batch_size=a.batch, preset=preset), trains="kd")
    d_params = result.params
    print(f"trained {a.steps} steps in {time.time() - t0:.0f} s; final loss {result.history[-1]['loss']:.3f}",
          flush=True)
    after = acceptance((t_cfg, t_params), (d_cfg, d_params), prompts, a.k, a.max_new)
    if a.out:
        l2m_jax.save(a.out, d_cfg, d_params)
    print(f"\n| draft ({len(layers)} of {t_cfg.n_layers} layers) | acceptance (K={a.k}) | tokens per target call | "
          f"speedup at 8B shapes (round = {ROUND_OVER_STEP_8B} steps) |")
    print("|---|---|---|---|")
    for name, s in (("untrained", before), (f"KD, {a.steps} steps", after)):
        print(f"| {name} | {s.acceptance_rate:.3f} | {s.tokens_per_call:.2f} | "
              f"{s.tokens_per_call / ROUND_OVER_STEP_8B:.2f}x |")


if __name__ == "__main__":
    main()
