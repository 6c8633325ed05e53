"""Drafts for speculative decoding, distilled from the teacher: build, train, save, load and measure them.

    teacher_cfg, teacher_params, tok = load_teacher(c)
    train_rows, prompts = split_heldout(chat_rows(c, out, teacher, tok))   # held-out prompts never train it
    data = distill_rows(c, train_rows, tok)                                 # the recipe's stage-1 rows
    draft = build_draft(teacher, "llama", n_layers=4)                       # or "mamba2" (calibration=...)
    result = distill_draft(draft, teacher, data, steps=2000, seconds=600)
    save_draft(out / "draft", (result.cfg, result.params), tok)
    draft = load_draft(out / "draft", target_cfg, target_tok)               # checks vocabulary and tokenizer
    table = acceptance(target, draft, prompts, ks=(2, 4, 6, 8), max_new_tokens=48)

Two kinds of draft, both sharing the teacher's vocabulary, embeddings, head and final norm:
  "llama"   N of the teacher's layers as they are (`infer.speculative.shrink`): a small Llama-type model;
  "mamba2"  the same layers with every mixer converted to Mamba2 by `hybridize` (attention weights initialise
            it; the recipe's default init "calibrated" measures output scales on stage-1 rows): a draft whose
            decode state does not grow with the context.
Training is end-to-end KD: every draft parameter trains on KL(teacher ‖ draft) (token mean; an optional CE
weight), for a number of steps or a wall-clock budget. Bad input raises DraftError (a recipe UsageError) naming
the model: a draft of another vocabulary or tokenizer, a K past a model's context, a folder without a tokenizer.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import UsageError

KINDS = ("llama", "mamba2")
BUDGET_STEPS = 100_000       # the schedule's length when only a wall-clock budget is given: a flat cosine


class DraftError(UsageError):
    """A draft (or target) that cannot be used as asked; the message names the model and the fix."""


# ------------------------------------------------------------------------------------------------ building
def draft_layer_ids(n_layers: int, n: int) -> list[int]:
    """n evenly spaced layer indices of an n_layers model, the first and the last included (30, 4 -> 0,9,19,29)."""
    if not 2 <= n <= n_layers:
        raise DraftError(f"a draft of {n} layers: choose 2 to {n_layers} layers of the {n_layers}-layer teacher "
                         "(2-6 make a fast draft)")
    return [i * (n_layers - 1) // (n - 1) for i in range(n)]


def build_draft(teacher, kind: str = "llama", layer_ids: Sequence[int] | None = None, n_layers: int = 4, *,
                init: str = "calibrated", calibration=None, calibration_mask=None, key=None):
    """A draft (cfg, params) made of `layer_ids` of the teacher (default: `draft_layer_ids(…, n_layers)`).

    kind "llama" keeps the layers as they are; "mamba2" converts every mixer with `hybridize(…, init=init)`
    (calibration: int [B, L] tokens for the "norm"/"calibrated" inits, e.g. `calibration_tokens(c, rows)`).
    The draft's parameters are copies: training it leaves the teacher untouched.
    """
    import jax
    import jax.numpy as jnp

    from l2m_jax.convert.hybridize import hybridize
    from l2m_jax.infer.speculative import shrink

    t_cfg, t_params = teacher
    if kind not in KINDS:
        raise DraftError(f"draft kind {kind!r}: choose 'llama' (teacher layers) or 'mamba2' (converted to Mamba2)")
    ids = draft_layer_ids(t_cfg.n_layers, n_layers) if layer_ids is None else [int(i) for i in layer_ids]
    if not ids or any(not 0 <= i < t_cfg.n_layers for i in ids) or len(set(ids)) != len(ids):
        raise DraftError(f"draft layer ids {ids}: give distinct indices of the teacher's {t_cfg.n_layers} layers "
                         f"(0 to {t_cfg.n_layers - 1})")
    cfg, params = shrink(t_cfg, t_params, ids)
    params = jax.tree.map(jnp.copy, params)     # the trainer donates its state; the teacher keeps its own
    if kind == "mamba2":
        if init in ("norm", "calibrated") and calibration is None:
            raise DraftError(f"a mamba2 draft with init={init!r} needs calibration tokens (stage-1 rows, e.g. "
                             "recipe.data.calibration_tokens(c, rows)); or choose init='mil' / 'conv'")
        kw = dict(calibration=calibration, calibration_mask=calibration_mask) if init in ("norm", "calibrated") else {}
        cfg, params = hybridize(cfg, params, [], "mamba2", jax.random.key(0) if key is None else key, init=init, **kw)
    return cfg, params


# ------------------------------------------------------------------------------------------------ data
def split_heldout(rows: list[dict], every: int = 10) -> tuple[list[dict], list[list[int]]]:
    """(training rows, held-out prompts): every `every`-th conversation (by position) is held out.

    Its prompt (the teacher's exact chat-templated prompt_ids) becomes an evaluation prompt, and every
    conversation with the same prompt leaves the training rows too, so no held-out prompt trains the draft.
    """
    if every < 2:
        raise DraftError(f"heldout every={every}: hold out one conversation in every >= 2")
    held, seen = [], set()
    for i, r in enumerate(rows):
        key = tuple(int(t) for t in r["prompt_ids"])
        if i % every == 0 and key not in seen:
            seen.add(key)
            held.append(list(key))
    train = [r for r in rows if tuple(int(t) for t in r["prompt_ids"]) not in seen]
    if not train or not held:
        raise DraftError(f"{len(rows)} conversations leave {len(train)} to train the draft on and {len(held)} "
                         "held-out prompts; the chat data needs more conversations")
    return train, held


# ------------------------------------------------------------------------------------------------ training
@dataclasses.dataclass
class DraftResult:
    cfg: Any
    params: Any
    steps: int                  # optimizer updates done
    seconds: float              # wall clock of training, compilation included
    stopped_by_budget: bool     # the wall-clock budget ended it before `steps` were planned to end
    tokens_per_s: float | None  # median over the steps after the first (which compiles)
    kl_first: float
    kl_last: float
    history: list


def distill_draft(draft, teacher, data: dict, *, steps: int | None = None, seconds: float | None = None,
                  batch_size: int = 8, lr: float = 5e-4, ce_weight: float = 0.0, kl_weight: float = 1.0,
                  warmup_steps: int | None = None, clip_norm: float | None = 1.0, seed: int = 0, mesh=None,
                  log_dir=None, progress: bool = True, loss_chunk: int | None = None, say=None) -> DraftResult:
    """End-to-end KD of a draft: every parameter trains on kl_weight·KL(teacher ‖ draft) + ce_weight·CE.

    data: stage-1 rows {"tokens", "loss_mask"} [N, L] (`distill_rows`). steps: optimizer updates (the cosine
    schedule's length); seconds: a wall-clock budget (compilation included) that stops training cleanly
    before it; with seconds alone the schedule is BUDGET_STEPS long, so the rate stays near its peak.
    """
    from l2m_jax.train.optim import StagePreset
    from l2m_jax.train.stages import StageSettings, distill_stage

    if steps is None and seconds is None:
        raise DraftError("draft training needs steps or seconds (a wall-clock budget), or both")
    if steps is not None and steps < 1:
        raise DraftError(f"steps={steps} must be >= 1")
    if seconds is not None and not seconds > 0:
        raise DraftError(f"seconds={seconds} must be a positive wall-clock budget")
    planned = steps if steps is not None else BUDGET_STEPS
    warm = warmup_steps if warmup_steps is not None else max(1, min(planned // 10, 100))
    preset = StagePreset(lr=lr, betas=(0.9, 0.999), clip_norm=clip_norm, warmup_steps=warm, ce_weight=ce_weight,
                         kl_weight=kl_weight)
    settings = StageSettings(steps=planned, batch_size=batch_size, preset=preset, seed=seed, progress=progress,
                             seconds=seconds)
    t0 = time.perf_counter()
    r = distill_stage(draft, teacher, {k: data[k] for k in ("tokens", "loss_mask")}, settings, trains="kd",
                      mesh=mesh, log_dir=log_dir, loss_chunk=loss_chunk, config={"draft": True})
    wall = time.perf_counter() - t0
    speeds = [h["tokens_per_s"] for h in r.history[1:]]
    result = DraftResult(r.cfg, r.params, len(r.history), wall, r.stopped_by_budget,
                         float(np.median(speeds)) if speeds else None,
                         r.history[0]["kl"] if r.history else float("nan"),
                         r.history[-1]["kl"] if r.history else float("nan"), r.history)
    if say is not None:
        why = f"the {seconds:g} s budget ended it" if result.stopped_by_budget else "all steps done"
        speed = f"{result.tokens_per_s:.0f} tokens/s" if result.tokens_per_s else "tokens/s: one step only"
        say(f"draft: trained {result.steps} of {planned} steps in {wall:.1f}s ({why}); KL {result.kl_first:.4f} "
            f"-> {result.kl_last:.4f}; {speed}")
    return result


# ------------------------------------------------------------------------------------------------ save / load
def save_draft(path, draft, tok) -> Path:
    """The draft in l2m format with the tokenizer beside it (what `l2m_jax.generate --draft DIR` loads)."""
    import l2m_jax

    path = Path(path)
    l2m_jax.save(path, draft[0], draft[1], format="l2m")
    tok.save_pretrained(path)
    return path


def load_model(spec, what: str):
    """(cfg, params, tokenizer) of a model directory with its tokenizer saved beside it, or the name 'smollm2'."""
    import l2m_jax
    from l2m_jax.data.tokenizer import TOKENIZER_FILES, has_tokenizer

    spec = os.fspath(spec)
    if spec != "smollm2" and not os.path.exists(spec):
        raise DraftError(f"{what} {spec!r}: no such file or directory; pass a model directory saved with its "
                         "tokenizer (e.g. RUN/final/l2m) or the name 'smollm2'")
    if os.path.isdir(spec) and not has_tokenizer(spec):
        raise DraftError(f"{what} {spec!r} has no tokenizer beside it (none of {list(TOKENIZER_FILES)}), so it "
                         f"cannot be checked against the other model's; save one there "
                         f"(tokenizer.save_pretrained({spec!r}))")
    cfg, params = l2m_jax.load(spec)
    return cfg, params, l2m_jax.load_tokenizer(spec)


def check_compatible(target_cfg, target_tok, draft_cfg, draft_tok, *, target: str = "the target",
                     draft: str = "the draft") -> None:
    """Raise DraftError unless draft and target share one vocabulary (`infer.speculative.check_draft_vocabulary`:
    model vocab sizes, and equal tokenizers)."""
    from l2m_jax.infer.speculative import check_draft_vocabulary

    try:
        check_draft_vocabulary(target_cfg, target_tok, draft_cfg, draft_tok, target=target, draft=draft)
    except ValueError as e:
        raise DraftError(str(e)) from None


def load_draft(path, target_cfg, target_tok, *, target: str = "the target"):
    """A saved draft (cfg, params), checked against the target's vocabulary and tokenizer (`check_compatible`)."""
    d_cfg, d_params, d_tok = load_model(path, "draft")
    check_compatible(target_cfg, target_tok, d_cfg, d_tok, target=target, draft=f"draft {os.fspath(path)!r}")
    return d_cfg, d_params


# ------------------------------------------------------------------------------------------------ acceptance
def acceptance(target, draft, prompts, ks: Sequence[int] = (2, 4, 6, 8), max_new_tokens: int = 48, *,
               eos_id: int | None = None, batch_size: int | None = None, backend: str = "xla",
               target_name: str = "the target", draft_name: str = "the draft", say=None) -> dict[int, dict]:
    """Greedy speculative decoding of `prompts` (token-id lists) with every K: {K: measures}; `say`, if
    given, hears each K's measures as they are done.

    Measures: "acceptance_rate" (accepted / proposed drafts), "tokens_per_call" (tokens emitted per verifier
    call and row), "target_calls", "seconds" (wall clock, compilation included unless JAX's persistent
    compilation cache is on: then every K's program is compiled first, all at once in threads,
    `infer.speculative.precompile_speculative`), "greedy_match" (the share of prompts whose output equals the
    target's plain greedy decoding), "divergence_gaps" (for each prompt whose output differs, the target's logit
    gap between the two tokens where they part, `divergence_gaps`: near 0 when float rounding broke a near tie,
    as the verifier's batched, padded shapes round differently from plain decoding's; a large gap is an error).
    Every K is checked against both models' contexts before anything runs (`check_speculative_fits`).
    """
    from l2m_jax.infer.generate import generate
    from l2m_jax.infer.speculative import check_speculative_fits, precompile_speculative, speculative_generate

    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise DraftError(f"ks={ks}: give one or more draft lengths K >= 1")
    if not prompts:
        raise DraftError("no prompts to measure acceptance on")
    longest = max(len(p) for p in prompts)
    for k in ks:
        for (cfg, _), name in ((target, target_name), (draft, draft_name)):
            try:
                check_speculative_fits(cfg, longest, max_new_tokens, k, model=name)
            except ValueError as e:
                raise DraftError(str(e)) from None
    size = batch_size or len(prompts)
    batches = [prompts[s:s + size] for s in range(0, len(prompts), size)]
    t0 = time.perf_counter()
    for b in {len(b): b for b in batches}.values():       # one batch of each size: the programs' shapes
        if precompile_speculative(target, draft, b, max_new_tokens, ks, eos_id=eos_id, backend=backend) and say:
            say(f"compiled speculative decoding at K = {', '.join(map(str, ks))} in parallel for batches of "
                f"{len(b)} in {time.perf_counter() - t0:.0f}s")
    greedy = [row for b in batches for row in generate(*target, b, max_new_tokens, eos_id=eos_id, backend=backend)]
    table = {}
    for k in ks:
        t0 = time.perf_counter()
        out, acc, drafted, calls = [], 0, 0, 0
        for b in batches:
            rows, s = speculative_generate(target, draft, b, max_new_tokens, k=k, eos_id=eos_id, backend=backend)
            out += rows
            acc, drafted, calls = acc + s.accepted, drafted + s.drafted, calls + s.target_calls
        rate = acc / max(drafted, 1)
        table[k] = {"acceptance_rate": rate, "tokens_per_call": 1 + k * rate, "target_calls": calls,
                    "seconds": time.perf_counter() - t0,
                    "greedy_match": float(np.mean([list(a) == list(g) for a, g in zip(out, greedy)])),
                    "divergence_gaps": divergence_gaps(target, prompts, greedy, out)}
        if say:
            say(f"K={k}: acceptance {rate:.3f}, {1 + k * rate:.2f} tokens per target call, {calls} target calls, "
                f"{table[k]['seconds']:.0f}s (compilation included)")
    return table


def divergence_gaps(target, prompts, reference, outputs) -> list[float]:
    """For every prompt whose `outputs` row differs from its `reference` row (token-id lists), the target's
    logit of the reference token minus that of the output token at the first position where they differ,
    computed by one full forward pass over the prompt and the shared prefix; inf where one row merely stops
    early (an EOS or length difference, not a choice between two tokens)."""
    import jax.numpy as jnp

    from l2m_jax import forward

    cfg, params = target
    gaps = []
    for p, ref, got in zip(prompts, reference, outputs):
        ref, got = list(ref), list(got)
        if ref == got:
            continue
        i = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        if i is None:
            gaps.append(float("inf"))
            continue
        logits = forward(cfg, params, jnp.asarray([list(p) + ref[:i]], jnp.int32))[0][0, -1].astype(jnp.float32)
        gaps.append(float(logits[ref[i]] - logits[got[i]]))
    return gaps


def decode_speed(target, draft, prompts, ks: Sequence[int] = (4,), max_new_tokens: int = 48, *,
                 batch_sizes: Sequence[int] = (1, 8), eos_id: int | None = None, backend: str = "xla",
                 reps: int = 3, say=None) -> dict[int, dict]:
    """Wall-clock decoding speed, plain greedy against greedy speculative, per batch size: {B: measures}.

    For each B the prompts go through in batches of B (as many whole batches as there are prompts, at least
    one); every mode first runs once on exactly those batches (compiling, or with the persistent compilation
    cache on loading what `precompile_speculative` compiled for every K at once), then `reps` more times, and
    the median is kept, so compilation is not timed. Measures: "plain_tokens_per_s" (new tokens emitted by
    `generate` / seconds) and, per K, "tokens_per_s", "speedup" (over plain), "acceptance_rate",
    "tokens_per_call"; "prompts" (how many were decoded)."""
    from l2m_jax.infer.generate import generate
    from l2m_jax.infer.speculative import precompile_speculative, speculative_generate

    if not prompts:
        raise DraftError("no prompts to time decoding on")
    if reps < 1:
        raise DraftError(f"reps={reps}: time at least one run")

    def timed(run):
        run()                                             # compiles every batch shape
        results = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = run()
            results.append((time.perf_counter() - t0, out))
        seconds = float(np.median([s for s, _ in results]))
        return seconds, results[-1][1]

    table = {}
    for size in (int(b) for b in batch_sizes):
        if size < 1:
            raise DraftError(f"batch size {size}: give sizes >= 1")
        count = max(size, len(prompts) // size * size)
        rows = [prompts[i % len(prompts)] for i in range(count)]
        batches = [rows[s:s + size] for s in range(0, count, size)]
        precompile_speculative(target, draft, batches[0], max_new_tokens, ks, eos_id=eos_id, backend=backend)

        def plain():
            return [r for b in batches for r in generate(*target, b, max_new_tokens, eos_id=eos_id, backend=backend)]

        seconds, out = timed(plain)
        entry = {"prompts": count, "plain_tokens_per_s": sum(map(len, out)) / seconds, "plain_seconds": seconds}
        for k in (int(k) for k in ks):
            def spec(k=k):
                outs, accepted, drafted, calls = [], 0, 0, 0
                for b in batches:
                    r, s = speculative_generate(target, draft, b, max_new_tokens, k=k, eos_id=eos_id,
                                                backend=backend)
                    outs += r
                    accepted, drafted, calls = accepted + s.accepted, drafted + s.drafted, calls + s.target_calls
                return outs, accepted / max(drafted, 1)

            s_seconds, (s_out, rate) = timed(spec)
            tps = sum(map(len, s_out)) / s_seconds
            entry[k] = {"tokens_per_s": tps, "speedup": tps / entry["plain_tokens_per_s"], "seconds": s_seconds,
                        "acceptance_rate": rate, "tokens_per_call": 1 + k * rate}
        table[size] = entry
        if say:
            say(f"decode speed, batch {size}: plain {entry['plain_tokens_per_s']:.1f} tokens/s; "
                + "; ".join(f"K={k} {entry[k]['tokens_per_s']:.1f} tokens/s ({entry[k]['speedup']:.2f}x)"
                            for k in ks))
    return table
