"""A draft for speculative decoding, distilled from the teacher, and its measured acceptance.

    python -m experiments.train_draft --run runs/smollm2-gpu --kind llama --layers 4 --seconds 600 \\
        --target runs/smollm2-gpu/final/l2m --k 2,4,6,8
    python -m experiments.train_draft --preset smollm2 --kind mamba2 --layer-ids 0,9,19,29 --steps 300
    python -m experiments.train_draft --data chatterbot --layer-ids 0,1,2,3,4,5,6,7 --steps 150 --k 4

Settings and data come from the recipe (`l2m_jax.recipe`): `--run RUN_DIR` takes a zephyr_distill run's
config.yaml and reuses its chat data (RUN_DIR/chat); `--preset NAME` (default: the one zephyr_distill would
choose) takes experiments/configs/NAME.yaml and reuses the chat data of its `out` (RUN). Where RUN has none, the
teacher makes it there as the recipe does (zephyr_distill with the same settings then reuses it). Trailing
key=value arguments override the config (e.g. teacher=tiny-random). The draft trains on the recipe's stage-1
rows (`distill_rows`: the teacher's chat data and any data.text sources) minus the held-out conversations: every
--heldout-every-th conversation, whose prompt (and every conversation sharing it) never trains the draft and
measures its acceptance. `--data chatterbot` instead trains on the ChatterBot corpus's own conversations and
holds out the first turns of every --heldout-every-th one, as this command did before it took the recipe's data.

Draft (`l2m_jax.recipe.draft`): --kind llama (the teacher's embeddings, head, final norm and --layers N evenly
spaced layers, first and last included, or --layer-ids) or --kind mamba2 (the same layers converted to Mamba2
with the recipe's init), or --draft DIR to start from a saved one. End-to-end KD: every draft parameter trains
on KL(teacher ‖ draft) (token mean) + --ce · CE, for --steps (default 150; 0: measure only) and/or --seconds of
wall clock, compilation included (with --seconds alone the cosine schedule is 100k steps long, so the learning
rate stays near its peak). Acceptance: greedy speculative decoding of the held-out prompts by --target (default:
the teacher) for every --k, before and after training, checked against plain greedy decoding. The draft is saved
with its tokenizer in --out (default RUN/draft-KIND-NL), loadable by `python -m l2m_jax.generate --model TARGET
--draft OUT`, with draft.json (settings, training time, tokens/s, acceptance per K). --speed 1,8 also times
plain against speculative greedy decoding of the held-out prompts by --target at those batch sizes (wall clock,
compilation excluded: `recipe.decode_speed`). With the GPU-measured cost
of one K=4 round (BENCHMARKS.md: 2.01 plain 8B-hybrid steps) it prints the speedup that acceptance gives at 8B
shapes: E[tokens per round] / 2.01.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

ROUND_OVER_STEP_8B = 2.01  # measured: one K=4 round / one plain step, 8B-shape 50% hybrid (BENCHMARKS.md)
ROUND_OVER_STEP_K = 4      # the K that ratio was measured at


def split_conversations(rows, eval_every: int = 10):
    """Every `eval_every`-th conversation is held out: its first user turn becomes an evaluation prompt."""
    train = [r for i, r in enumerate(rows) if i % eval_every]
    held = [r["messages"][0]["content"] for i, r in enumerate(rows) if not i % eval_every]
    return train, held


def _ints(text: str, flag: str) -> list[int]:
    from l2m_jax.recipe import UsageError

    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give comma-separated integers, e.g. {flag} 0,9,19,29") from None
    if not values:
        raise UsageError(f"{flag} is empty")
    return values


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m experiments.train_draft", description=__doc__.split("\n")[0],
                                 usage="%(prog)s [options] [key=value ...]")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", help="recipe preset (experiments/configs/NAME.yaml); default: as zephyr_distill")
    src.add_argument("--run", metavar="RUN_DIR", help="a zephyr_distill run: its config.yaml and chat data")
    ap.add_argument("--data", choices=("recipe", "chatterbot"), default="recipe",
                    help="recipe: the stage-1 rows; chatterbot: the corpus's own conversations (the old default)")
    ap.add_argument("--kind", choices=("llama", "mamba2"), default="llama")
    ap.add_argument("--layers", default="4", help="N evenly spaced teacher layers (a comma list: --layer-ids)")
    ap.add_argument("--layer-ids", help="the teacher layers to keep, e.g. 0,9,19,29")
    ap.add_argument("--draft", metavar="DIR", help="start from this saved draft (with its tokenizer) instead")
    ap.add_argument("--steps", type=int, default=None, help="optimizer updates (default 150 without --seconds)")
    ap.add_argument("--seconds", type=float, default=None, help="wall-clock training budget")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ce", type=float, default=0.0, help="CE weight beside the KL (weight 1)")
    ap.add_argument("--seq", type=int, default=128, help="row length of --data chatterbot (recipe: data.seq_len)")
    ap.add_argument("--target", metavar="DIR_OR_NAME", help="the model the draft serves (default: the teacher)")
    ap.add_argument("--k", default="2,4,6,8", help="draft lengths K to measure")
    ap.add_argument("--eval-prompts", type=int, default=32)
    ap.add_argument("--heldout-every", type=int, default=10)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--no-before", action="store_true",
                    help="do not measure the untrained draft (one compile-heavy pass over every K less)")
    ap.add_argument("--speed", metavar="B[,B...]", default="",
                    help="after training, time plain and speculative greedy decoding of the held-out prompts at "
                         "these batch sizes (wall clock, compilation excluded), e.g. --speed 1,8")
    ap.add_argument("--speed-reps", type=int, default=3, help="timed runs per mode and batch size (median)")
    ap.add_argument("--out", metavar="DIR", help="where the draft and draft.json go (default RUN/draft-KIND-NL)")
    return ap


def _config(a, overrides: list[str]):
    """(recipe config, the run folder whose chat data to reuse, how the config was chosen)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from experiments.distill_config import Config, load_config
    from l2m_jax.recipe import UsageError

    if a.run is None:
        c, choice = load_config(([f"preset={a.preset}"] if a.preset else []) + overrides)
        return c, Path(c.out), choice
    saved = Path(a.run) / "config.yaml"
    if not saved.is_file():
        raise UsageError(f"--run {a.run!r}: no config.yaml there; pass the out folder of a zephyr_distill run "
                         "(e.g. runs/smollm2-gpu), or --preset NAME")
    bad = [x for x in overrides if "=" not in x or x.startswith("-")]
    if bad:
        raise UsageError(f"arguments {bad} are neither options nor key=value overrides; see --help")
    try:
        c = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved), OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise UsageError(f"--run {a.run!r}: {str(e).splitlines()[0]}") from None
    return c, Path(a.run), f"the configuration of the run {a.run}"


def _layer_ids(a, n_layers: int) -> list[int]:
    from l2m_jax.recipe import draft_layer_ids

    if a.layer_ids is not None:
        return _ints(a.layer_ids, "--layer-ids")
    if "," in str(a.layers):            # the old --layers 0,1,2,... spelling
        return _ints(a.layers, "--layers")
    return draft_layer_ids(n_layers, _ints(a.layers, "--layers")[0])


def _chatterbot_data(a, tok, pad_id: int):
    from l2m_jax.data.chat import encode_chat_prompt, render_chat
    from l2m_jax.data.chatterbot import chatterbot_rows
    from l2m_jax.data.packing import pack_sequences

    train_rows, held = split_conversations(chatterbot_rows(), a.heldout_every)
    examples = []
    for r in train_rows:
        ids = tok.encode(render_chat(tok, r["messages"], add_generation_prompt=False), add_special_tokens=False)
        examples.append((ids, np.ones(len(ids), bool)))
    data, _ = pack_sequences(examples, a.seq, pad_id, drop_last=True)
    prompts = [list(encode_chat_prompt(tok, [{"role": "user", "content": q}])) for q in held]
    return {k: data[k] for k in ("tokens", "loss_mask")}, prompts


def _table(ks, before, after, steps_label: str) -> str:
    lines = [f"| K | acceptance untrained | acceptance {steps_label} | tokens per target call untrained | "
             f"tokens per target call {steps_label} | output = greedy |", "|---|---|---|---|---|---|"]
    for k in ks:
        f = after[k]
        b = before[k] if before else {"acceptance_rate": float("nan"), "tokens_per_call": float("nan"),
                                      "greedy_match": f["greedy_match"]}
        lines.append(f"| {k} | {b['acceptance_rate']:.3f} | {f['acceptance_rate']:.3f} | {b['tokens_per_call']:.2f} "
                     f"| {f['tokens_per_call']:.2f} | {_match_cell(b, f)} |")
    return "\n".join(lines)


def _match_cell(*measures) -> str:
    """The share of prompts decoded exactly as plain greedy decoding (the lower of before / after), and where
    any row parts from it, the largest logit gap at which one does (`recipe.draft.divergence_gaps`)."""
    cell = f"{100 * min(m['greedy_match'] for m in measures):.0f}%"
    gaps = [g for m in measures for g in m.get("divergence_gaps", [])]
    if gaps:
        cell += f" ({len(gaps)} rows part at logit gaps <= {max(gaps):.2g})"
    return cell


def _speed_table(ks, speed) -> str:
    lines = ["| batch | prompts | plain tokens/s | " + " | ".join(f"K={k} tokens/s (speedup, acceptance)" for k in ks)
             + " |", "|" + "---|" * (3 + len(ks))]
    for size, e in speed.items():
        cells = [f"{e[k]['tokens_per_s']:.1f} ({e[k]['speedup']:.2f}x, {e[k]['acceptance_rate']:.3f})" for k in ks]
        lines.append(f"| {size} | {e['prompts']} | {e['plain_tokens_per_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(a, overrides: list[str]) -> dict:
    import jax

    import l2m_jax
    from l2m_jax.data.jsonl import write_json
    from l2m_jax.recipe import (UsageError, acceptance, build_draft, check_compatible, check_config, chat_rows,
                                decode_speed, distill_draft, distill_rows, load_draft, load_teacher, save_draft,
                                split_heldout)
    from l2m_jax.recipe.data import calibration_tokens, say, special_ids
    from l2m_jax.recipe.draft import BUDGET_STEPS, load_model
    from l2m_jax.recipe.config import use_kernels
    from l2m_jax.recipe.run import use_compilation_cache

    c, run_dir, choice = _config(a, overrides)
    check_config(c)
    ks = _ints(a.k, "--k")
    speed_batches = _ints(a.speed, "--speed") if a.speed else []
    steps = a.steps if a.steps is not None or a.seconds is not None else 150
    if steps is not None and steps < 0:
        raise UsageError(f"--steps {steps} must be >= 0 (0: measure acceptance only)")
    say(f"train_draft: {choice}")
    use_compilation_cache()
    use_kernels(c)
    t_cfg, t_params, tok = load_teacher(c)
    teacher = (t_cfg, t_params)
    pad_id, eos_id = special_ids(tok)
    layer_ids = None if a.draft else _layer_ids(a, t_cfg.n_layers)
    default_out = f"draft-{a.kind}-{len(layer_ids)}l" if layer_ids else "draft-" + Path(a.draft).name
    out = Path(a.out) if a.out else run_dir / default_out
    if out.resolve() in (run_dir.resolve(), *run_dir.resolve().parents) or (out / "config.yaml").exists():
        raise UsageError(f"--out {str(out)!r} is (or holds) a run folder; the draft's folder is replaced when it "
                         "is saved, so choose a folder of its own (default RUN/draft-KIND-NL)")
    say(f"teacher {c.teacher}: {t_cfg.n_layers} layers, vocab {t_cfg.vocab_size}; out {out}")

    if a.target:
        tg_cfg, tg_params, tg_tok = load_model(a.target, "--target")
        target_name = f"target {a.target!r}"
        check_compatible(tg_cfg, tg_tok, t_cfg, tok, target=target_name,
                         draft=f"the draft (the tokenizer of teacher {c.teacher!r})")
        target = (tg_cfg, tg_params)
    else:
        target, target_name, tg_tok = teacher, f"teacher {c.teacher!r}", tok
    say(f"target: {target_name}, {target[0].pattern}")

    if a.draft:          # before the data: a bad draft fails fast
        draft = load_draft(a.draft, target[0], tg_tok, target=target_name)
        check_compatible(t_cfg, tok, draft[0], l2m_jax.load_tokenizer(a.draft), target=f"teacher {c.teacher!r}",
                         draft=f"draft {a.draft!r}")
        draft_name = f"draft {a.draft!r}"

    if a.data == "chatterbot":
        data, prompts = _chatterbot_data(a, tok, pad_id)
        source = "ChatterBot conversations"
    else:
        say(f"chat data: reused from {run_dir / 'chat'}" if (run_dir / "chat").exists() else
            f"chat data: none in {run_dir}; the teacher makes it there, as the recipe does")
        rows = chat_rows(c, run_dir, teacher, tok)
        train_rows, prompts = split_heldout(rows, a.heldout_every)
        say(f"draft data: {len(train_rows)} of {len(rows)} conversations train the draft; {len(prompts)} held-out "
            "prompts")
        data = distill_rows(c, train_rows, tok, teacher=teacher, out=run_dir)
        source = "the recipe's stage-1 rows"
    prompts = prompts[:a.eval_prompts]

    if not a.draft:
        calib = calibration_tokens(c, data) if a.kind == "mamba2" else None
        draft = build_draft(teacher, a.kind, layer_ids, init=c.init, calibration=calib,
                            key=jax.random.key(c.seed))
        draft_name = f"the {a.kind} draft (layers {layer_ids})"
    say(f"draft: {draft_name}, {draft[0].pattern}; {len(data['tokens'])} training rows of "
        f"{data['tokens'].shape[1]} tokens ({source}); {len(prompts)} held-out prompts")

    measure = dict(ks=ks, max_new_tokens=a.max_new, eos_id=eos_id, target_name=target_name, draft_name=draft_name,
                   say=say)
    before = None if a.no_before else acceptance(target, draft, prompts, **measure)
    if before:
        say("before training: " + "; ".join(f"K={k} acceptance {v['acceptance_rate']:.3f}"
                                            for k, v in before.items()))
    training = None
    if steps != 0:
        result = distill_draft(draft, teacher, data, steps=steps, seconds=a.seconds, batch_size=a.batch, lr=a.lr,
                               ce_weight=a.ce, seed=c.seed, progress=c.progress, say=say)
        draft = (result.cfg, result.params)
        training = {"steps": result.steps, "planned_steps": steps or BUDGET_STEPS, "seconds_budget": a.seconds,
                    "seconds": result.seconds, "stopped_by_budget": result.stopped_by_budget,
                    "tokens_per_s": result.tokens_per_s, "kl_first": result.kl_first, "kl_last": result.kl_last,
                    "final_loss": result.history[-1]["loss"] if result.history else None}
    record = {"settings": {"choice": choice, "teacher": c.teacher, "preset": c.preset, "run": a.run,
                           "target": a.target or c.teacher, "data": a.data, "kind": a.kind if not a.draft else None,
                           "layer_ids": layer_ids, "draft": a.draft, "steps": steps, "seconds": a.seconds,
                           "batch": a.batch, "lr": a.lr, "ce_weight": a.ce, "kl_weight": 1.0, "ks": ks,
                           "max_new_tokens": a.max_new, "heldout_every": a.heldout_every, "overrides": overrides},
              "draft": {"pattern": draft[0].pattern, "n_layers": draft[0].n_layers,
                        "params": int(sum(x.size for x in jax.tree.leaves(draft[1])))},
              "data": {"rows": int(len(data["tokens"])), "seq_len": int(data["tokens"].shape[1]),
                       "heldout_prompts": len(prompts)},
              "training": training,
              "acceptance": {"before": {str(k): v for k, v in before.items()} if before else None, "after": None},
              "speedup_8b": None, "decode_speed": None}
    # saved before it is measured: a measurement that fails or is stopped loses no training
    save_draft(out, draft, tok)
    write_json(out / "draft.json", record)
    say(f"draft saved to {out}; measuring its acceptance at K = {', '.join(map(str, ks))}")
    after = acceptance(target, draft, prompts, **measure) if training or not before else before
    k4 = {w: t[ROUND_OVER_STEP_K]["tokens_per_call"] / ROUND_OVER_STEP_8B
          for w, t in (("before", before), ("after", after)) if t and ROUND_OVER_STEP_K in t}
    record["acceptance"]["after"] = {str(k): v for k, v in after.items()}
    record["speedup_8b"] = {"round_over_step": ROUND_OVER_STEP_8B, "k": ROUND_OVER_STEP_K, **k4}
    write_json(out / "draft.json", record)
    speed = None
    if speed_batches:
        speed = decode_speed(target, draft, prompts, ks, a.max_new, batch_sizes=speed_batches, eos_id=eos_id,
                             reps=a.speed_reps, say=say)
        record["decode_speed"] = {str(b): {str(k): v for k, v in e.items()} for b, e in speed.items()}
        write_json(out / "draft.json", record)
    label = f"KD, {training['steps']} steps" if training else "as loaded"
    print(f"\n{draft_name} of the {t_cfg.n_layers}-layer teacher, target {target_name}, {len(prompts)} held-out "
          f"prompts, <= {a.max_new} new tokens\n")
    print(_table(ks, before, after, label))
    if speed:
        print(f"\nwall-clock greedy decoding on this machine ({jax.devices()[0].device_kind}), target {target_name}, "
              f"<= {a.max_new} new tokens, median of {a.speed_reps}\n")
        print(_speed_table(ks, speed))
    if k4:
        print(f"\nspeedup at 8B shapes (one K={ROUND_OVER_STEP_K} round = {ROUND_OVER_STEP_8B} plain steps): "
              + ", ".join(f"{w} {v:.2f}x" for w, v in k4.items()))
    say(f"draft saved to {out} (with its tokenizer; draft.json); use it with "
        f"`python -m l2m_jax.generate --model {a.target or c.teacher} --draft {out}`")
    return record


def main(argv=None) -> int:
    from l2m_jax.assets import AssetError
    from l2m_jax.config import ConfigError
    from l2m_jax.data.chat import DataError
    from l2m_jax.data.tokenizer import TokenizerError
    from l2m_jax.errors import CheckpointError
    from l2m_jax.recipe import UsageError
    from l2m_jax.train.stages import StageError

    a, overrides = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(a, overrides)
    except (UsageError, DataError, ConfigError, TokenizerError, CheckpointError, StageError, AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
