"""The fidelity ablation at 50% attention and equal stage-1 budget (RESULTS.md): initialisation, stage 0, data.

    python -m experiments.fidelity_ablation [--run runs/smollm2-gpu] [--steps 300] [--text DIR ...]

Reuses the chat data of a finished (or started) main-job run in --run (the teacher's synthesised requests and
answers, and its answers to the ChatterBot seed prompts), so nothing is generated twice. Every arm converts the
teacher's even layers to Mamba2 (odd layers keep attention) and trains the mixers for --steps stage-1 steps of
the preset's batch; arms differ in one thing each:
  init     mil | conv | norm | calibrated | random           (chat data, no stage 0)
  stage0   the best init of the first group + --stage0-steps of layer-wise alignment first
  data     chatterbot (seed-prompt pseudo-labels only) | synthesised (all chat data) | synthesised + text
           (--text: plain-text files / folders, mixed 1:1 by rows), at the best setting so far
  recipe   every --variant NAME KEY=VALUE ...: the config's init, stage 0 and --text data with the variant's
           overrides (e.g. stage1.alpha=0 data.mix.text=3 stage1.steps=800 rounds=0.5,0.25), run as the main
           job's progressive rounds (each round converts more layers of the previous round's student, aligns
           them if stage0.enabled, then trains stage 1); a round written sft:F (rounds=0.5,sft:0.25,sft:0.125)
           is one of MiL's SFT rounds instead: convert, then end-to-end KD of every parameter with the sft.*
           settings (sft.steps, sft.lr), no stage 0; stage1.layer_order=aligned (or aligned_kl) runs the
           recipe's align-all stage first (stage 0 once, every layer converted) and converts in its order, with
           its mixers and no per-round stage 0 (--reuse-align: the --run's own align-all and order instead);
           scored after every round, with tokens/s; stage1.keep_induction=K turns the teacher's K strongest
           induction layers Mamba last (with --reuse-align: in the run's order as ranked before its own
           keep_induction), stage1.teacher_cache=true runs the steps on the teacher's cached hidden states.
           --start MODEL_DIR: the rounds start from that model (e.g. the run's 50% model: rounds=0.25 against
           rounds=sft:0.5,0.25 isolates a KD round before the 25% one)
Held-out perplexity ratio and top-1 agreement on every eval text, and the copy NLL (in-context recall on repeated
random tokens, `l2m_jax.recipe.run.copy_nll`) of every arm; ablation.json and ablation.md land in --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
from omegaconf import OmegaConf

import l2m_jax
from experiments.distill_config import load_config
from l2m_jax.convert.hybridize import attention_layers_for
from l2m_jax.recipe.data import calibration_tokens, distill_rows, say
from l2m_jax.recipe.config import ALIGNED_ORDERS, use_kernels
from l2m_jax.recipe.run import (Run, copy_nll, evaluate, keep_induction, stage1_trains, stage_settings,
                                use_compilation_cache, with_teacher_hidden)
from l2m_jax.train.align import LAYER_SCORES, align_stage, conversion_order, take_mixers
from l2m_jax.train.report import confidence_ratio, context_ratio, drop_per_token
from l2m_jax.train.stages import distill_stage


# what an arm cannot change: the teacher, its dtype and the chat data are loaded once for every arm
SHARED = ("teacher", "tokenizer", "dtype", "mesh", "eval", "synth", "pseudo_labels", "out", "preset")
SHARED_DATA = ("data.prompts", "data.max_prompts", "data.max_prompt_len")


def parse_variant(ap, name: str, overrides: list[str]) -> tuple[str, list[str], list[str]]:
    """(name, rounds, config dotlist) of one --variant NAME KEY=VALUE ...; rounds=F1,F2 (default 0.5)."""
    rounds, dotlist = ["0.5"], []
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep:
            ap.error(f"--variant {name}: {o!r} is not KEY=VALUE")
        if key == "rounds":
            rounds = value.split(",")
        elif key.split(".")[0] in SHARED or key.startswith(SHARED_DATA):
            ap.error(f"--variant {name}: {key} is shared by every arm (one teacher, one set of chat data "
                     "and held-out texts are loaded for all of them); pass it with --set, once per command")
        else:
            dotlist.append(o)
    return name, rounds, dotlist


def score(run: Run, model, teacher_eval) -> dict:
    scores, _ = evaluate(*model, run.texts, run.c.eval.window, run.teacher_top1())
    for name, e in scores.items():
        e["ratio"] = e["perplexity"] / teacher_eval[name]["perplexity"]
        e["context_ratio"] = context_ratio(e, teacher_eval[name])
        e["confidence_ratio"] = confidence_ratio(e, teacher_eval[name])
    for e in scores.values():
        drop_per_token(e)              # kept only until the ratios are taken (the teacher's stay)
    return scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.fidelity_ablation", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="smollm2-gpu")
    ap.add_argument("--run", default=None, help="the main job's out folder whose chat data to reuse (default runs/PRESET)")
    ap.add_argument("--out", default="runs/fidelity_ablation")
    ap.add_argument("--steps", type=int, default=300, help="stage-1 steps of every arm")
    ap.add_argument("--stage0-steps", type=int, default=150)
    ap.add_argument("--text", nargs="*", default=[], help="plain text for the 'synthesised + text' arm")
    ap.add_argument("--groups", default="init,stage0,data")
    ap.add_argument("--best-init", default=None, help="the init the stage0/data groups use when the init group "
                    "does not run (default: the config's)")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value config overrides")
    ap.add_argument("--reuse-align", action="store_true", help="recipe arms in an aligned layer order take the "
                    "--run's own align-all model and layer order (RUN/stages/align-all, RUN/layer_order.json) "
                    "instead of running align-all again: the run's exact layer sets")
    ap.add_argument("--start", default=None, metavar="MODEL_DIR", help="recipe arms start their rounds from this "
                    "model (e.g. RUN/stages/stage1-mamba50/model) instead of the teacher; implies --reuse-align "
                    "for aligned orders, so its layers are the ones the rounds convert from")
    ap.add_argument("--variant", action="append", nargs="+", default=[], metavar="NAME_OR_KEY=VALUE",
                    help="a 'recipe' arm: its name, then config overrides KEY=VALUE; rounds=F1,F2 sets its "
                    "attention fractions (default 0.5)")
    a = ap.parse_args(argv)
    variants = [parse_variant(ap, name, overrides) for name, *overrides in a.variant]   # before loading anything
    run_dir = a.run or f"runs/{a.preset}"
    if a.start is not None and not Path(a.start).exists():
        ap.error(f"--start {a.start}: no such model directory (a stage's model of a run, e.g. "
                 f"{run_dir}/stages/stage1-mamba50/model)")
    reuse = a.reuse_align or a.start is not None
    if reuse and not (Path(run_dir) / "layer_order.json").exists():
        ap.error(f"--reuse-align / --start take the layer order of {run_dir}/layer_order.json, which does not exist: "
                 "run the main job with stage1.layer_order=aligned into --run first, or leave both out")
    c, _ = load_config([f"preset={a.preset}", f"out={run_dir}", "progress=false", *a.set])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    use_compilation_cache()
    use_kernels(c)
    run = Run(c, Path(run_dir))
    teacher_eval = run.evaluate("teacher", *run.teacher)
    teacher_copy = copy_nll(c, run.teacher)
    say(f"teacher: copy NLL {teacher_copy:.3f} (the second copy of repeated random tokens, eval.recall)")
    rows = run.rows()
    groups = a.groups.split(",")
    data, calib = {}, None
    if set(groups) - {"recipe"}:
        data = {"synthesised": distill_rows(c, rows, run.tok),
                "chatterbot": distill_rows(c, [r for r in rows if r.get("source") == "seed"], run.tok)}
        if a.text:
            data["synthesised + text"] = distill_rows(OmegaConf.merge(c, {"data": {"text": a.text}}), rows, run.tok)
        calib = calibration_tokens(c, data["synthesised"])
    keep = attention_layers_for(run.teacher[0].n_layers, 0.5)
    results = []

    def save_results() -> None:
        (out / "ablation.json").write_text(json.dumps({"teacher": teacher_eval, "teacher_copy_nll": teacher_copy,
                                                       "arms": results}, indent=1))

    def arm(group: str, init: str, stage0: bool, data_name: str) -> dict:
        t0 = time.perf_counter()
        kw = {"calibration": calib} if init in ("norm", "calibrated") else {}
        student = l2m_jax.hybridize(*run.teacher, keep, c.mixer, jax.random.key(c.seed), init=init, **kw)
        before = score(run, student, teacher_eval)
        rows_ = data[data_name]
        if stage0:
            s0 = stage_settings(OmegaConf.merge(c, {"stage0": {"steps": a.stage0_steps}}), "stage0", len(rows_["tokens"]))
            aligned = align_stage(student, run.teacher, rows_, s0, mesh=run.mesh)
            student = (aligned.cfg, aligned.params)
        settings = stage_settings(OmegaConf.merge(c, {"stage1": {"steps": a.steps}}), "stage1", len(rows_["tokens"]))
        r = distill_stage(student, run.teacher, rows_, settings, kl_reduction=c.stage1.kl_reduction, mesh=run.mesh)
        after = score(run, (r.cfg, r.params), teacher_eval)
        res = {"group": group, "init": init, "stage0": stage0, "data": data_name, "steps": a.steps,
               "stage0_steps": a.stage0_steps if stage0 else 0, "rows": int(len(rows_["tokens"])),
               "before": before, "after": after, "final_loss": r.history[-1]["loss"] if r.history else None,
               "copy_nll": copy_nll(c, (r.cfg, r.params)), "wall_s": time.perf_counter() - t0}
        results.append(res)
        save_results()
        say(f"[{group}] init={init} stage0={stage0} data={data_name}: " + "; ".join(
            f"{k} x{v['ratio']:.3f} (before x{before[k]['ratio']:.4g}), top-1 {100 * v['agreement']:.1f}%"
            for k, v in after.items()) + f" in {res['wall_s']:.0f}s")
        return res

    built: dict = {}
    aligned_all: dict = {}
    start = None if a.start is None else l2m_jax.load(a.start)
    if start is not None:
        say(f"[recipe] every arm starts from {a.start} ({start[0].pattern}): " + "; ".join(
            f"{k} x{v['ratio']:.3f}" for k, v in score(run, start, teacher_eval).items()))

    def recipe_arm(name: str, rounds: list[str], dotlist: list[str]) -> None:
        cv = OmegaConf.merge(c, {"stage1": {"steps": a.steps}, "stage0": {"steps": a.stage0_steps},
                                 "data": {"text": a.text}}, OmegaConf.from_dotlist(dotlist))
        key = (tuple(cv.data.text), tuple(sorted(cv.data.mix.items())), cv.data.seq_len, cv.data.repeat_period,
               cv.data.teacher_text_rows, cv.data.teacher_text_prefix)
        if key not in built:
            built[key] = distill_rows(cv, rows, run.tok, teacher=run.teacher, out=Path(a.out))
        rows_ = built[key]
        cached = bool(cv.stage1.teacher_cache)      # the teacher's hidden states of the rows, once per data and dtype
        if cached and (key, cv.compute_dtype) not in built:
            built[key, cv.compute_dtype] = with_teacher_hidden(cv, run.teacher, rows_)
        train_rows = built[key, cv.compute_dtype] if cached else rows_     # for the stage-1 and KD steps
        student = run.teacher if start is None else start
        n_stage1 = 0
        n_layers = run.teacher[0].n_layers
        kw = {"calibration": calibration_tokens(cv, rows_)} if cv.init in ("norm", "calibrated") else {}
        order = every = None
        dt = cv.compute_dtype
        if cv.stage1.layer_order in ALIGNED_ORDERS and reuse:    # the run's own align-all and layer order
            record = json.loads((Path(run_dir) / "layer_order.json").read_text())
            if record.get("metric", "nmse") != ALIGNED_ORDERS[cv.stage1.layer_order]:
                raise SystemExit(f"--variant {name}: stage1.layer_order={cv.stage1.layer_order} ranks by "
                                 f"{ALIGNED_ORDERS[cv.stage1.layer_order]}, but {run_dir}/layer_order.json was "
                                 f"ranked by {record.get('metric', 'nmse')}; leave out --reuse-align/--start")
            every = run.aligned_model()      # the order before the run's own stage1.keep_induction, if it had one
            order = keep_induction(cv, run.teacher, record.get("ranked", record["order"]))[0]
            say(f"[recipe] {name}: layer order {order} and align-all's mixers from {run_dir}")
        elif cv.stage1.layer_order in ALIGNED_ORDERS:   # the recipe's align-all: stage 0 once, every layer converted
            # variants that differ only after it share it
            metric = ALIGNED_ORDERS[cv.stage1.layer_order]
            a_key = (key, cv.init, cv.seed, cv.calibration_rows, dt, OmegaConf.to_yaml(cv.stage0))
            t0 = time.perf_counter()
            if a_key not in aligned_all:
                every = l2m_jax.hybridize(*run.teacher, [], cv.mixer, jax.random.key(cv.seed), init=cv.init, **kw)
                r = align_stage(every, run.teacher, rows_, stage_settings(cv, "stage0", len(rows_["tokens"])),
                                mesh=run.mesh, compute_dtype=dt)
                aligned_all[a_key] = (r.cfg, r.params), {}
            every, orders = aligned_all[a_key]
            if metric not in orders:
                scores = LAYER_SCORES[metric](every, run.teacher, rows_, batch_size=cv.stage0.batch_size)
                orders[metric] = conversion_order(scores, n_layers)
            order = keep_induction(cv, run.teacher, orders[metric])[0]
            say(f"[recipe] {name}: layer order {order} (stage 0 of every layer in {time.perf_counter() - t0:.0f}s)")
        for r_i, spec in enumerate(rounds):
            t0 = time.perf_counter()
            sft = spec.startswith("sft:")      # MiL's SFT round: convert, then KD of every parameter, no stage 0
            frac = float(spec[4:] if sft else spec)
            keep = attention_layers_for(n_layers, frac, order)
            key_r = jax.random.fold_in(jax.random.key(cv.seed), r_i)
            if order is not None:
                new = [i for i in student[0].attn_layers if i not in keep]
                student = take_mixers(l2m_jax.hybridize(*student, keep, cv.mixer, key_r, init="random"), every, new)
            else:
                student = l2m_jax.hybridize(*student, keep, cv.mixer, key_r, init=cv.init, **kw)
            before = score(run, student, teacher_eval)
            if cv.stage0.enabled and not sft and order is None:
                s0 = stage_settings(cv, "stage0", len(rows_["tokens"]))
                aligned = align_stage(student, run.teacher, rows_, s0, mesh=run.mesh, compute_dtype=dt)
                student = (aligned.cfg, aligned.params)
            if sft:
                settings = stage_settings(OmegaConf.merge(cv, {"sft": {"loss": "kd"}}), "sft", len(rows_["tokens"]))
            else:
                settings = stage_settings(cv, "stage1", len(rows_["tokens"]), round_index=n_stage1)
                n_stage1 += 1
            t1 = time.perf_counter()
            trains = "kd" if sft else stage1_trains(cv)
            r = distill_stage(student, run.teacher, train_rows, settings, kl_reduction=cv.stage1.kl_reduction,
                              mesh=run.mesh, trains=trains, compute_dtype=dt, teacher_cached=cached)
            jax.block_until_ready(r.params)
            t2 = time.perf_counter()
            student = (r.cfg, r.params)
            after = score(run, student, teacher_eval)
            tokens = settings.steps * settings.batch_size * cv.data.seq_len
            res = {"group": "recipe", "variant": name, "overrides": dotlist, "round": frac, "kind": "sft" if sft
                   else "stage1", "init": cv.init, "attn_layers": list(keep),
                   "stage0": bool(cv.stage0.enabled) and not sft and order is None,
                   "data": f"{'+'.join(map(str, cv.data.text)) or 'chat'} "
                   f"mix {dict(cv.data.mix)}", "steps": settings.steps, "batch_size": settings.batch_size,
                   "stage0_steps": cv.stage0.steps if cv.stage0.enabled and not sft and order is None else 0,
                   "rows": int(len(rows_["tokens"])),
                   "before": before, "after": after, "final_loss": r.history[-1]["loss"] if r.history else None,
                   "copy_nll": copy_nll(cv, student), "stage1_s": t2 - t1,
                   "stage1_tokens_per_s": tokens / (t2 - t1), "wall_s": time.perf_counter() - t0}
            results.append(res)
            save_results()
            say(f"[recipe] {name} {'SFT' if sft else 'stage-1'} round {frac}: " + "; ".join(
                f"{k} x{v['ratio']:.3f}, top-1 {100 * v['agreement']:.1f}%" for k, v in after.items())
                + f"; copy NLL {res['copy_nll']:.3f}; {settings.steps} steps in {t2 - t1:.0f}s ({tokens / (t2 - t1):,.0f} tok/s); "
                f"round {res['wall_s']:.0f}s")

    def mean_ratio(res):
        return sum(v["ratio"] for v in res["after"].values()) / len(res["after"])

    best = {"init": a.best_init or c.init, "stage0": False}
    if "init" in groups:
        inits = [arm("init", i, False, "synthesised") for i in ("mil", "conv", "norm", "calibrated", "random")]
        best["init"] = min((r for r in inits if r["init"] != "random"), key=mean_ratio)["init"]
    if "stage0" in groups:
        without = [r for r in results if r["init"] == best["init"] and not r["stage0"] and r["data"] == "synthesised"]
        without = without[0] if without else arm("stage0", best["init"], False, "synthesised")
        best["stage0"] = mean_ratio(arm("stage0", best["init"], True, "synthesised")) < mean_ratio(without)
    if "recipe" in groups:
        if not a.variant:
            ap.error("--groups recipe needs at least one --variant NAME [KEY=VALUE ...]")
        for name, rounds, dotlist in variants:
            recipe_arm(name, rounds, dotlist)
    if "data" in groups:
        for name in data:
            if not any(r["data"] == name and r["init"] == best["init"] and r["stage0"] == best["stage0"]
                       for r in results):
                arm("data", best["init"], best["stage0"], name)
    texts = list(teacher_eval)
    lines = ["| group | init | stage 0 | data | " + " | ".join(f"{t} ratio (before) | {t} top-1" for t in texts)
             + f" | copy NLL (teacher {teacher_copy:.3f}) | time (s) |", "|" + "---|" * (6 + 2 * len(texts))]
    for r in results:
        group = r["group"]
        if group == "recipe":
            group = f"recipe: {r['variant']} {'SFT ' if r.get('kind') == 'sft' else ''}@ {r['round']:g}"
        lines.append(f"| {group} | {r['init']} | {'yes' if r['stage0'] else 'no'} | {r['data']} | " + " | ".join(
            f"{r['after'][t]['ratio']:.3f} ({r['before'][t]['ratio']:.4g}) | {100 * r['after'][t]['agreement']:.1f}%"
            for t in texts) + f" | {r['copy_nll']:.3f} | {r['wall_s']:.0f} |")
    table = "\n".join(lines)
    (out / "ablation.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
