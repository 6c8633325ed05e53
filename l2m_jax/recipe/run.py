"""Running the recipe: the plan, one stage at a time, evaluation, export and the report.

    run = Run(c, out)                                  # teacher, mesh, held-out texts; data built on first use
    plan = make_plan(c, run.teacher[0].n_layers, layer_order(run))   # [align-all,] [align-…,] stage1-…, sft-…, dpo-…
    student, records = run.teacher, []
    for i, stage in enumerate(plan):
        if stage.name != ALIGN_ALL:                    # (stage1.layer_order=aligned: trained by layer_order)
            record, student = run_stage(run, i, stage, student)   # saves stages/NAME/{model, logs, done.json}
            records.append(record)
    export(run, lambda: student, plan[-1].name)
    write_run_report(run, plan, records)               # report.md, report.json, plots/

`pipeline(c, out)` does all of it, skipping finished stages and resuming an interrupted one.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import ALIGNED_ORDERS, UsageError, use_kernels
from l2m_jax.data.jsonl import write_json

from .data import (calibration_tokens, chat_rows, distill_rows, heldout_ids, load_teacher, preference_rows, say,
                   sft_rows, synthesis_stats)


def use_compilation_cache() -> None:
    """On GPUs, keep compiled programs in $L2M_CACHE/xla: a re-run (or resumed run) skips most compiling."""
    import jax

    from l2m_jax.assets import cache_dir

    if jax.default_backend() == "gpu":
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def peak_memory_bytes() -> int | None:
    """The first device's memory high-water mark, where the backend reports one (GPUs)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(cfg, params, texts: dict[str, np.ndarray], window: int, teacher_top1=None) -> tuple[dict, dict]:
    """({text: {"perplexity", "tokens", "agreement", "context_nll", "token_nll", "token_entropy"}}, {text: top-1
    predictions}) on the held-out texts; "context_nll" is the mean NLL by context length within the window,
    "token_nll" every scored token's NLL, "token_entropy" the entropy of the model's prediction of it
    (`eval.heldout.score_texts`)."""
    from l2m_jax.eval.agreement import top1_agreement
    from l2m_jax.eval.heldout import score_texts

    scores, preds = {}, {}
    for name, r in score_texts(cfg, params, texts, window).items():   # one compiled forward for all texts
        preds[name] = r["top1"]                                              # [N, W]
        agreement = None if teacher_top1 is None else top1_agreement(preds[name], teacher_top1[name])
        scores[name] = {"perplexity": r["perplexity"], "tokens": r["tokens"], "agreement": agreement,
                        "context_nll": r["context_nll"],
                        "token_nll": [round(float(x), 4) for x in r["token_nll"]],
                        "token_entropy": [round(float(x), 4) for x in r["token_entropy"]]}
    return scores, preds


def preference_eval(policy, reference, pairs: dict, beta: float, batch_size: int) -> dict:
    """DPO's reward accuracy, mean reward margin and loss of `policy` against `reference` on preference pairs.

    Every batch has `batch_size` rows (the last one filled up with copies of its first pair, whose results are
    dropped), so the evaluations before and after DPO run one compiled program (`stages.dpo_pair_logratios`,
    which `ahead.CompileAhead` compiles while earlier stages train)."""
    from l2m_jax.train.stages import dpo_pair_logratios, preference_metrics

    n = len(pairs["chosen_tokens"])
    chosen, rejected = [], []
    for s in range(0, n, batch_size):
        batch = {k: _fill_rows(v[s:s + batch_size], batch_size) for k, v in pairs.items()}
        c, r = dpo_pair_logratios(policy[0], reference[0], policy[1], reference[1], batch)
        rows = min(batch_size, n - s)
        chosen.append(np.asarray(c)[:rows])
        rejected.append(np.asarray(r)[:rows])
    return preference_metrics(np.concatenate(chosen), np.concatenate(rejected), beta) | {"pairs": n}


def _fill_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """`a` [n, ...] with n <= rows, filled up to `rows` rows with copies of its first row."""
    a = np.asarray(a)
    return a if len(a) == rows else np.concatenate([a, np.repeat(a[:1], rows - len(a), axis=0)])


# ------------------------------------------------------------------------------------------------ the run
class Run:
    """The state of one run: config, teacher, mesh, held-out texts; data built on first use and kept."""

    def __init__(self, c, out: Path):
        import jax

        from l2m_jax import parallel

        self.c, self.out = c, Path(out)
        try:
            self.mesh = parallel.make_mesh(c.mesh.data, c.mesh.fsdp)
        except ValueError as e:
            raise UsageError(f"mesh.data={c.mesh.data}, mesh.fsdp={c.mesh.fsdp}: {e}") from None
        n_dev = self.mesh.size // max(1, jax.process_count())
        for kind in ("stage0", "stage1", "sft", "dpo"):
            if getattr(c, kind).batch_size % n_dev:
                raise UsageError(f"{kind}.batch_size={getattr(c, kind).batch_size} is not a multiple of the "
                                 f"{n_dev} local devices of the mesh {dict(self.mesh.shape)}")
        say(f"teacher: loading {c.teacher}")
        t_cfg, t_params, self.tok = load_teacher(c)
        self.teacher = (t_cfg, t_params)
        say(f"teacher: {t_cfg.n_layers} layers, d_model {t_cfg.d_model}, vocab {t_cfg.vocab_size}; "
            f"mesh {dict(self.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
        self.texts = heldout_ids(c, self.tok)
        self._rows = self._teacher_top1 = self._aligned = None
        self._data: dict[str, Any] = {}
        # what the data builders noted for the report (a text source unavailable, decontamination counts);
        # kept in out/data_notes.json so that a resumed run that builds no data still reports it
        notes = self.out / "data_notes.json"
        self.notes: dict[str, Any] = json.loads(notes.read_text()) if notes.exists() else {}

    def rows(self) -> list[dict]:
        """The teacher's chat data, generated (or read back) on first use."""
        if self._rows is None:
            self._rows = chat_rows(self.c, self.out, self.teacher, self.tok)
        return self._rows

    def data(self, kind: str):
        """The rows a stage kind trains on; stage 0 and end-to-end KD (sft.loss="kd") share stage 1's."""
        if kind == "stage0" or (kind == "sft" and self.c.sft.loss == "kd"):
            kind = "stage1"
        if kind not in self._data:
            build = {"stage1": distill_rows, "sft": sft_rows, "dpo": preference_rows}[kind]
            kw = {"teacher": self.teacher, "out": self.out} if kind == "stage1" else {}
            self._data[kind] = build(self.c, self.rows(), self.tok, notes=self.notes, **kw)
            if kind == "stage1" and self.c.stage1.teacher_cache:
                self._data[kind] = with_teacher_hidden(self.c, self.teacher, self._data[kind])
            write_json(self.out / "data_notes.json", self.notes)
        return self._data[kind]

    def aligned_model(self):
        """The student of stage `ALIGN_ALL` (every layer converted and aligned), read once from its folder."""
        if self._aligned is None:
            import l2m_jax

            path = self.out / "stages" / ALIGN_ALL / "model"
            if not path.exists():
                raise UsageError(f"stage1.layer_order={self.c.stage1.layer_order} needs the {ALIGN_ALL} stage's "
                                 f"model in {path}; "
                                 "run the recipe's layer_order(run) first")
            self._aligned = l2m_jax.load(path)
        return self._aligned

    def teacher_top1(self):
        if self._teacher_top1 is None:
            result, self._teacher_top1 = evaluate(*self.teacher, self.texts, self.c.eval.window)
            write_json(self.out / "eval" / "teacher.json", result)
        return self._teacher_top1

    def evaluate(self, name: str, cfg, params) -> dict:
        """Evaluate once; kept in out/eval/NAME.json for later runs."""
        path = self.out / "eval" / f"{name}.json"
        if not path.exists():
            top1 = self.teacher_top1()
            if name != "teacher":
                write_json(path, evaluate(cfg, params, self.texts, self.c.eval.window, top1)[0])
        return json.loads(path.read_text())

    def copy_nll(self, name: str, cfg, params) -> float:
        """`copy_nll` once; kept in out/eval/NAME.copy.json for later runs."""
        path = self.out / "eval" / f"{name}.copy.json"
        if not path.exists():
            write_json(path, {"copy_nll": copy_nll(self.c, (cfg, params)), "rows": COPY_ROWS,
                              "period": copy_period(self.c)})
        return json.loads(path.read_text())["copy_nll"]


COPY_ROWS = 8       # the held-out scorer's rows per forward, so the recall probe reuses its compiled program


def copy_period(c) -> int:
    """The recall probe's period: half the evaluation window (rows of the window's width)."""
    return max(2, int(c.eval.window) // 2)


def copy_nll(c, model) -> float:
    """`eval.recall.copy_loss` of `model` on COPY_ROWS rows of the evaluation window's width: in-context recall,
    on the program the held-out evaluation compiled for the model (where the texts fill the window)."""
    from l2m_jax.eval.recall import copy_loss

    return copy_loss(model, rows=COPY_ROWS, period=copy_period(c))


TEACHER_CACHE_LIMIT_GB = 32.0


def with_teacher_hidden(c, teacher, rows: dict) -> dict:
    """The stage-1 rows with the teacher's final hidden states of every row (stage1.teacher_cache), computed
    once in the training steps' compute dtype."""
    import jax.numpy as jnp

    from l2m_jax.train.stages import TEACHER_HIDDEN, teacher_hidden_states

    n, length = rows["tokens"].shape
    itemsize = jnp.dtype(c.compute_dtype or teacher[0].dtype).itemsize
    gb = n * length * teacher[0].d_model * itemsize / 1e9
    if gb > TEACHER_CACHE_LIMIT_GB:
        raise UsageError(f"stage1.teacher_cache=true would keep {gb:.1f} GB of teacher hidden states in memory "
                         f"({n} rows x {length} tokens x {teacher[0].d_model} x {itemsize} bytes), more than "
                         f"{TEACHER_CACHE_LIMIT_GB:g} GB; set stage1.teacher_cache=false (the teacher then runs "
                         "in every step) or train on fewer rows")
    t0 = time.perf_counter()
    hidden = teacher_hidden_states(teacher, rows["tokens"], batch_size=c.stage1.batch_size,
                                   compute_dtype=c.compute_dtype)
    say(f"stage-1 data: the teacher's hidden states of {n} rows cached ({gb:.2f} GB, {hidden.dtype}) in "
        f"{time.perf_counter() - t0:.1f}s; stage-1 and KD steps run only its head")
    return dict(rows, **{TEACHER_HIDDEN: hidden})


def describe(scores: dict, teacher: dict | None = None) -> str:
    parts = []
    for name, e in scores.items():
        s = f"{name} ppl {e['perplexity']:.3f}"
        if teacher is not None:
            s += f" (x{e['perplexity'] / teacher[name]['perplexity']:.3f})"
        if e.get("agreement") is not None:
            s += f", top-1 {100 * e['agreement']:.1f}%"
        parts.append(s)
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ the plan
ALIGN_ALL = "align-all"


def make_plan(c, n_layers: int, order=None):
    """The stages of the run (l2m_jax.train.stages.schedule).

    stage1.layer_order="mil": MiL's layer sets, stage 0 (if enabled) before every stage-1 round on its layers.
    "aligned" / "aligned_kl": first `ALIGN_ALL`, stage 0 with every layer converted, then the rounds with the
    layer sets of `order` (`layer_order(run)`, from that stage; None gives MiL's sets, for the stage names only) and no
    per-round stage 0: each round takes its new mixers from the aligned student (`convert`).
    """
    from l2m_jax.train.stages import PlannedStage, schedule

    aligned = c.stage1.layer_order in ALIGNED_ORDERS
    plan = schedule(n_layers, stage1=list(c.stage1.attn_fractions), sft=list(c.sft.attn_fractions),
                    dpo=c.dpo.enabled, stepwise=c.stage1.stepwise, align=c.stage0.enabled and not aligned,
                    order=order, interleave=c.sft.interleave)
    return [PlannedStage(ALIGN_ALL, "stage0", ())] + plan if aligned else plan


def layer_order(run: Run) -> list[int] | None:
    """The conversion order of stage1.layer_order="aligned" / "aligned_kl" (None for "mil"): runs stage
    `ALIGN_ALL` (stage 0 with every layer converted, resumable like every stage) unless an earlier run finished
    it, then ranks the layers by its per-layer error ("aligned": `train.align.layer_nmse`) or by the output KL
    of each layer converted alone ("aligned_kl": `train.align.layer_kl`), on the first 128 stage-1 rows
    (`conversion_order`); kept in out/layer_order.json and in the report's data notes."""
    from l2m_jax.eval.recall import induction_scores
    from l2m_jax.train.align import LAYER_SCORES, conversion_order
    from l2m_jax.train.stages import PlannedStage

    c = run.c
    if c.stage1.layer_order not in ALIGNED_ORDERS:
        return None
    metric = ALIGNED_ORDERS[c.stage1.layer_order]
    path = run.out / "layer_order.json"
    if path.exists():
        return json.loads(path.read_text())["order"]
    stage, n_layers = PlannedStage(ALIGN_ALL, "stage0", ()), run.teacher[0].n_layers
    done = run.out / "stages" / ALIGN_ALL / "done.json"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # the teacher's induction scores (a compile and one small forward) while align-all runs
        probe = pool.submit(induction_scores, run.teacher) if c.stage1.keep_induction else None
        if not done.exists():
            say(f"{ALIGN_ALL}: stage 0 with all {n_layers} layers converted, to rank them "
                "(stage1.layer_order=aligned)")
            from .ahead import AlignAllAhead

            run_stage(run, 0, stage, run.teacher, AlignAllAhead.start(run))
        scores = LAYER_SCORES[metric](run.aligned_model(), run.teacher, run.data("stage0"),
                                      batch_size=c.stage0.batch_size)
        ranked = conversion_order(scores, n_layers)
        order, induction = keep_induction(c, run.teacher, ranked, None if probe is None else probe.result())
    plan = make_plan(c, n_layers, order)
    keeps = {p.name: list(p.attn_layers) for p in plan if p.kind == "stage1"}
    record = {"order": order, "metric": metric, metric: {str(i): v for i, v in sorted(scores.items())},
              "ranked": ranked, **induction, "attention_kept": keeps}
    write_json(path, record)
    run.notes["layer_order"] = record
    write_json(run.out / "data_notes.json", run.notes)
    say(order_line(record))
    return order


def keep_induction(c, teacher, ranked: list[int], scores: dict[int, float] | None = None
                   ) -> tuple[list[int], dict]:
    """(conversion order, what to record): `ranked` with the teacher's stage1.keep_induction layers of strongest
    induction heads (`scores`, else `eval.recall.induction_scores`) converted last, the strongest last; `ranked` itself
    when 0."""
    from l2m_jax.eval.recall import induction_scores, top_induction_layers
    from l2m_jax.train.align import keep_last

    k = int(c.stage1.keep_induction)
    if not k:
        return list(ranked), {}
    scores = induction_scores(teacher) if scores is None else scores
    if k > len(scores):
        raise UsageError(f"stage1.keep_induction={k}, but the teacher has {len(scores)} attention layers")
    top = top_induction_layers(scores, k)
    return keep_last(ranked, top), {"induction": {str(i): v for i, v in scores.items()}, "kept_for_induction": top}


def order_line(record: dict) -> str:
    """One line on a layer order (`layer_order`'s record): the order and the attention layers of each round."""
    by = {"nmse": "stage-0 error", "kl": "output KL with it converted alone"}[record.get("metric", "nmse")]
    kept = (f", then the strongest induction layers {record['kept_for_induction']} (stage1.keep_induction)"
            if record.get("kept_for_induction") else "")
    return (f"layer order ({ALIGN_ALL}'s {by} per layer{kept}, converted first to last): {record['order']}; "
            "attention kept: " + "; ".join(f"{k} {v}" for k, v in record["attention_kept"].items()))


def stage1_round(c, n_layers: int, stage) -> int | None:
    """The 0-based index of a stage-1 stage among the plan's stage-1 rounds (None for other kinds)."""
    if stage.kind != "stage1":
        return None
    rounds = [p.name for p in make_plan(c, n_layers) if p.kind == "stage1"]
    return rounds.index(stage.name)


def stage_settings(c, kind: str, rows: int, round_index: int | None = None):
    """The StageSettings of a stage kind; `round_index` (the stage-1 round, 0-based) picks stage1.round_steps."""
    from l2m_jax.train.optim import StagePreset
    from l2m_jax.train.stages import StageSettings

    s = getattr(c, kind)
    steps = s.steps
    if kind == "stage1" and round_index is not None and getattr(s, "round_steps", None):
        steps = int(s.round_steps[round_index])
    steps = steps or max(1, rows // (s.batch_size * s.accum_steps))
    distills = kind == "stage1" or (kind == "sft" and s.loss == "kd")
    preset = StagePreset(lr=s.lr, betas=tuple(s.betas), eps=s.eps, weight_decay=s.weight_decay,
                         clip_norm=s.clip_norm, warmup_steps=s.warmup_steps, warmup_ratio=s.warmup_ratio,
                         accum_steps=s.accum_steps,
                         ce_weight=s.alpha if distills else None,
                         kl_weight=s.beta if distills else None,
                         dpo_beta=s.beta if kind == "dpo" else None)
    return StageSettings(steps=steps, batch_size=s.batch_size, preset=preset, seed=c.seed,
                         save_every=c.save_every, progress=c.progress,
                         allow_config_change=bool(getattr(c, "resume_with_changes", False)))


def convert(run: Run, index: int, stage, student):
    """`student` with the stage's layer set: newly converted layers initialised by c.init."""
    import jax

    import l2m_jax

    from l2m_jax.train.align import take_mixers

    c = run.c
    s_cfg, s_params = student
    if s_cfg.attn_layers == stage.attn_layers:
        return student
    key = jax.random.fold_in(jax.random.key(c.seed), index)
    t0 = time.perf_counter()
    if c.stage1.layer_order in ALIGNED_ORDERS and stage.name != ALIGN_ALL:
        # the new mixers come from the student aligned with every layer converted; their init is replaced
        new = [i for i in range(s_cfg.n_layers) if i in s_cfg.attn_layers and i not in stage.attn_layers]
        s_cfg, s_params = take_mixers(l2m_jax.hybridize(s_cfg, s_params, stage.attn_layers, c.mixer, key,
                                                         init="random"), run.aligned_model(), new)
        say(f"{stage.name}: converted to {s_cfg.pattern}, mixers of layers {new} from {ALIGN_ALL} in "
            f"{time.perf_counter() - t0:.1f}s")
        return s_cfg, s_params
    kw = {}
    if c.init in ("norm", "calibrated"):
        kw["calibration"] = calibration_tokens(c, run.data("stage1"))
    s_cfg, s_params = l2m_jax.hybridize(s_cfg, s_params, stage.attn_layers, c.mixer, key, init=c.init, **kw)
    say(f"{stage.name}: converted to {s_cfg.pattern} with init={c.init} in {time.perf_counter() - t0:.1f}s")
    if index == 0:
        init = run.evaluate("init", s_cfg, s_params)
        say(f"{c.init}-initialised hybrid: {describe(init, run.evaluate('teacher', *run.teacher))}; copy NLL "
            f"{run.copy_nll('init', s_cfg, s_params):.3f}")
    return s_cfg, s_params


def nonfinite_message(c, stage, e) -> str:
    """What a NaN/inf stage-training metric means for the run and what to change (e: a NonFiniteError)."""
    k, s = stage.kind, getattr(c, stage.kind)
    clip = f"a smaller {k}.clip_norm (now {s.clip_norm:g})" if s.clip_norm else f"{k}.clip_norm (now off; e.g. 1.0)"
    if e.checkpoint_step is None:
        resume = (f"no {'usable ' if e.set_aside else ''}checkpoint of {stage.name} was saved before step {e.step}, "
                  "so the re-run starts this stage from its beginning")
    else:
        resume = f"the re-run resumes this stage from its checkpoint at step {e.checkpoint_step} ({e.ckpt_dir})"
    aside = ""
    if e.set_aside:
        names = ", ".join(os.path.basename(p) for p in e.set_aside)
        aside = (f" Moved aside {names} in {e.ckpt_dir}: they hold the parameters step {e.step} started from, so "
                 "resuming them would repeat it.")
    return (f"{stage.name}: training stopped at step {e.step}: the metric {e.metric!r} is {e.value}. Lower {k}.lr "
            f"(now {s.lr:g}), set {clip} or check the stage's data for bad values; then run the same command "
            f"with the changed value and resume_with_changes=true: {resume}, and finished stages are kept.{aside}")


def _say_restore(name: str, restore: dict) -> None:
    for q in restore.get("quarantined", []):
        say(f"{name}: checkpoint step {q['step']} does not restore ({q['error']}); moved it to {q['moved_to']}")
    if restore.get("config_changes"):
        say(f"{name}: resumed step {restore['step']} with changed settings: {'; '.join(restore['config_changes'])}")


def stage_setup(c, stage, student, teacher, settings, reference=None):
    """The stage's `StageSetup` (l2m_jax.train.stages / align) for its kind: its loss, params and trainable mask.

    The one place the recipe's settings become a stage's training program: the real stage (`_train`) and the
    compilation ahead of it (`ahead.CompileAhead`) both call it; the models may be abstract (jax.ShapeDtypeStructs).
    """
    from l2m_jax.train import stages
    from l2m_jax.train.align import align_setup

    dt = c.compute_dtype
    if stage.kind == "stage0":
        return align_setup(student, teacher, compute_dtype=dt)
    chunk = getattr(c, stage.kind).loss_chunk
    if stage.kind == "stage1" or (stage.kind == "sft" and c.sft.loss == "kd"):
        # sft.loss="kd" is MiL's end-to-end KD: every parameter trains, against the teacher
        trains = stage1_trains(c) if stage.kind == "stage1" else "kd"
        return stages.distill_setup(student, teacher, settings, kl_reduction=c.stage1.kl_reduction,
                                    temperature=c.stage1.temperature, loss_chunk=chunk, trains=trains,
                                    compute_dtype=dt, teacher_cached=bool(c.stage1.teacher_cache))
    if stage.kind == "sft":
        return stages.sft_setup(student, settings, loss_chunk=chunk, compute_dtype=dt)
    return stages.dpo_setup(student, reference, settings, loss_chunk=chunk, compute_dtype=dt)


def stage1_trains(c) -> str:
    """What a stage-1 round trains (`optim.trainable_mask`): the Mamba mixers, and the kept attention layers too
    with stage1.train_attention."""
    return "stage1+attention" if c.stage1.train_attention else "stage1"


def _train(run: Run, stage, student, data, settings, dirs: dict, reference=None):
    """The stage's training call (l2m_jax.train.stages.run_setup) for its kind."""
    from l2m_jax.train.stages import run_setup

    return run_setup(stage_setup(run.c, stage, student, run.teacher, settings, reference), data, settings, **dirs)


def stage_inputs(run: Run, stage):
    """(data, held-out preference pairs or None, StageSettings) of a planned stage."""
    c = run.c
    data, heldout = run.data(stage.kind), None
    if stage.kind == "dpo":
        data, heldout = data
    settings = stage_settings(c, stage.kind, row_count(data),
                              round_index=stage1_round(c, run.teacher[0].n_layers, stage))
    return data, heldout, settings


def row_count(data: dict) -> int:
    """Rows of a stage's data (preference pairs for DPO)."""
    return len(data["tokens"] if "tokens" in data else data["chosen_tokens"])


def dpo_reference(c, teacher, policy):
    """DPO's frozen reference: the teacher, or (dpo.reference="sft") the policy as it starts."""
    return teacher if c.dpo.reference == "teacher" else policy


def run_stage(run: Run, index: int, stage, student,
              ahead=None) -> tuple[dict, Any]:
    """Train one planned stage from `student` (cfg, params); saves its model, returns (record, model).

    A NaN/inf metric raises NonFiniteError with `nonfinite_message`: the stage, step, metric and the fix.
    ahead: the run's `ahead.CompileAhead` (or `AlignAllAhead`), told that this stage starts (it waits for the stage's step if that is
    compiling ahead right now).
    """
    import l2m_jax
    from l2m_jax.train.loop import NonFiniteError, use_precompiled
    from l2m_jax.train.report import final_loss, read_metrics

    c, sdir = run.c, run.out / "stages" / stage.name
    s_cfg, s_params = convert(run, index, stage, student)
    data, heldout, settings = stage_inputs(run, stage)
    rows = row_count(data)
    extra: dict[str, Any] = {}
    if stage.kind == "dpo":
        reference = dpo_reference(c, run.teacher, (s_cfg, s_params))
        if heldout is not None:
            extra["preferences_before"] = preference_eval((s_cfg, s_params), reference, heldout, c.dpo.beta,
                                                          c.dpo.batch_size)
    if ahead is not None:
        ahead.claim(stage.name)
    say(f"{stage.name}: {len(s_cfg.ssm_layers)} of {s_cfg.n_layers} layers {c.mixer} ({s_cfg.pattern}); "
        f"{settings.steps} steps of {settings.batch_size}x{settings.preset.accum_steps} rows of {rows}")
    t0 = time.perf_counter()
    dirs = dict(mesh=run.mesh, ckpt_dir=sdir / "ckpt", log_dir=sdir / "logs", config={"name": stage.name})
    try:
        with use_precompiled(ahead.compiled(stage.name) if ahead is not None else ()):
            result = _train(run, stage, (s_cfg, s_params), data, settings, dirs,
                            reference if stage.kind == "dpo" else None)
    except NonFiniteError as e:
        raise NonFiniteError(nonfinite_message(c, stage, e), step=e.step, metric=e.metric, value=e.value,
                             checkpoint_step=e.checkpoint_step, ckpt_dir=e.ckpt_dir, set_aside=e.set_aside) from None
    if stage.kind == "dpo" and heldout is not None:
        extra["preferences_after"] = preference_eval((result.cfg, result.params), reference, heldout,
                                                     c.dpo.beta, c.dpo.batch_size)
    _say_restore(stage.name, result.restore)
    if result.start_step:
        say(f"{stage.name}: resumed from its checkpoint at step {result.start_step}")
    wall = time.perf_counter() - t0
    l2m_jax.save(sdir / "model", result.cfg, result.params, format="l2m")
    run.tok.save_pretrained(sdir / "model")      # so every stage's model loads as a target or draft on its own
    scores = run.evaluate(stage.name, result.cfg, result.params)
    copy = run.copy_nll(stage.name, result.cfg, result.params)
    history = read_metrics(sdir / "logs" / "metrics.jsonl")
    speeds = [h["tokens_per_s"] for h in history[1:] if "tokens_per_s" in h]   # step 1 includes compilation
    record = {"name": stage.name, "kind": stage.kind, "attn_layers": list(stage.attn_layers),
              "n_layers": s_cfg.n_layers, "steps": settings.steps, "final_loss": final_loss(history),
              "wall_s": wall, "tokens_per_s": float(np.median(speeds)) if speeds else None,
              "peak_bytes": peak_memory_bytes(), "eval": scores, "copy_nll": copy, **extra}
    write_json(sdir / "done.json", record)
    if not c.keep_checkpoints:
        shutil.rmtree(sdir / "ckpt", ignore_errors=True)
    say(f"{stage.name}: done in {wall:.0f}s; final loss {record['final_loss']:.4f}; "
        f"{describe(scores, run.evaluate('teacher', *run.teacher))}; copy NLL {copy:.3f} (teacher "
        f"{run.copy_nll('teacher', *run.teacher):.3f})")
    for when in ("before", "after"):
        p = extra.get(f"preferences_{when}")
        if p:
            say(f"{stage.name}: held-out preference accuracy {when} DPO {100 * p['reward_accuracy']:.1f}%, "
                f"reward margin {p['reward_margin']:.4f} ({p['pairs']} pairs)")
    return record, (result.cfg, result.params)


def pipeline(c, out: Path) -> Path:
    """The whole recipe into `out`; finished stages are skipped, an interrupted one resumes. Returns report.md.

    With JAX's persistent compilation cache on (`use_compilation_cache`: GPUs) and c.compile_ahead, the later
    stages' train steps compile in background threads while the first stage trains (`ahead.CompileAhead`).
    """
    import l2m_jax

    from .ahead import CompileAhead, compile_ahead_enabled

    say(f"recipe: preset {c.preset}, out {out}")
    use_compilation_cache()
    use_kernels(c)
    k = c.kernels
    say(f"kernels: attention {k.attention}, ssd {k.ssd}, decode attention {k.decode_attention}")
    run = Run(c, out)
    plan = make_plan(c, run.teacher[0].n_layers, layer_order(run))
    if not plan:
        raise UsageError("nothing to train: stage1.attn_fractions and sft.attn_fractions are empty and DPO is off")
    say("plan: " + " -> ".join(p.name for p in plan))
    teacher_eval = run.evaluate("teacher", *run.teacher)
    say(f"teacher: {describe(teacher_eval)}")
    records, student, source, ahead = [], run.teacher, None, None
    try:
        for i, stage in enumerate(plan):
            done = out / "stages" / stage.name / "done.json"
            if done.exists():
                records.append(json.loads(done.read_text()))
                student, source = None, out / "stages" / stage.name / "model"
                say(f"{stage.name}: finished in an earlier run, skipped")
            else:
                if student is None:
                    student = l2m_jax.load(source)
                if ahead is None and i + 1 < len(plan) and compile_ahead_enabled(c):
                    ahead = CompileAhead(run, plan, i, student)
                record, student = run_stage(run, i, stage, student, ahead)
                records.append(record)
                source = out / "stages" / stage.name / "model"
            if stage.name == ALIGN_ALL:   # a side branch: the rounds start from the teacher, taking its mixers
                student, source = run.teacher, None
    finally:
        if ahead is not None:
            ahead.stop()
    export(run, lambda: student if student is not None else l2m_jax.load(source), plan[-1].name)
    return write_run_report(run, plan, records)


def export(run: Run, model, stage_name: str) -> None:
    """Write the final model (`model()` -> (cfg, params)) in l2m and MiL format, unless already written."""
    import l2m_jax

    marker = run.out / "final" / "SOURCE.json"
    if marker.exists() and json.loads(marker.read_text()).get("stage") == stage_name:
        return
    cfg, params = model()
    formats = ["l2m"] + (["mil"] if cfg.ssm_layers else [])
    for fmt in formats:
        path = run.out / "final" / fmt
        l2m_jax.save(path, cfg, params, format=fmt)
        run.tok.save_pretrained(path)
    write_json(marker, {"stage": stage_name, "formats": formats})
    say(f"final model ({stage_name}, {cfg.pattern}) written to {run.out / 'final'} as {' and '.join(formats)}")


def tensorboard_note(out: Path) -> str:
    """The report's line on TensorBoard: the stages whose logs hold event files, and the command to view them."""
    logs = sorted(p.parent.relative_to(out) for p in (out / "stages").glob("*/logs/events.out.tfevents.*"))
    if not logs:
        return "TensorBoard: no event files were written (install tensorboardX); the curves are in metrics.jsonl"
    links = ", ".join(f"[{p.parent.name}]({p.as_posix()})" for p in dict.fromkeys(logs))
    return f"TensorBoard event files: {links}; view them with `tensorboard --logdir {out / 'stages'}`"


def data_notes(notes: dict) -> list[str]:
    """The report's lines on the training data: a text source that was unavailable, decontamination, screening
    against the held-out texts' books, and the layer order of stage1.layer_order=aligned."""
    lines = []
    if notes.get("layer_order"):
        lines.append(order_line(notes["layer_order"]))
    gone = notes.get("text_unavailable")
    if gone:
        lines.append(f"stage-1 text: data.text={gone['spec']} was unavailable, stage 1 trained without it "
                     f"({gone['error']}); to fix: {gone['fix']}")
    dec = notes.get("decontamination")
    if dec:
        parts = [f"{v['dropped']} of {v['of']} {what} ({v['tokens']} tokens)" for what, v in dec.items()
                 if isinstance(v, dict)]
        lines.append(f"decontamination: dropped what shares a {dec['ngram']}-token span with a held-out text: "
                     + "; ".join(parts))
    scr = notes.get("screening")
    if scr and scr.get("books") is None:
        lines.append("screening against the held-out texts' books (data.screen_books): the books were not there "
                     "(they come with data.text=prose), so only the held-out excerpts were screened")
    elif scr:
        parts = [f"{v['dropped']} of {v['of']} {what}" for what, v in scr.items() if isinstance(v, dict)]
        lines.append(f"screening: dropped what shares {scr['words']} words in a row with the held-out texts' "
                     f"books ({', '.join(scr['books'])}), beyond decontamination: " + "; ".join(parts))
    return lines


def write_run_report(run: Run, plan, records: list[dict]) -> Path:
    """report.md (table, DPO evaluation, plots) and report.json (every number) in the run's folder."""
    from l2m_jax.assets import HELDOUT_SOURCES
    from l2m_jax.train import report

    c, out, t_cfg = run.c, run.out, run.teacher[0]
    teacher_eval = run.evaluate("teacher", *run.teacher)
    rows = [report.ReportRow("teacher", "teacher", t_cfg.n_layers, t_cfg.n_layers, None, None, teacher_eval,
                             copy_nll=run.copy_nll("teacher", *run.teacher))]
    init, init_copy = out / "eval" / "init.json", out / "eval" / "init.copy.json"
    if init.exists() and plan:
        rows.append(report.ReportRow(f"{c.init}-initialised", "init", len(plan[0].attn_layers), t_cfg.n_layers,
                                     None, None, json.loads(init.read_text()), copy_nll=json.loads(
                                         init_copy.read_text())["copy_nll"] if init_copy.exists() else None))
    plots, histories = [], {}
    for r in records:
        rows.append(report.ReportRow(r["name"], r["kind"], len(r["attn_layers"]), r["n_layers"], r["steps"],
                                     r["final_loss"], r["eval"], r["wall_s"], r.get("tokens_per_s"),
                                     r.get("peak_bytes"), r.get("copy_nll")))
        history = report.read_metrics(out / "stages" / r["name"] / "logs" / "metrics.jsonl")
        if history:
            histories[r["name"]] = history
            png = out / "plots" / f"{r['name']}.png"
            report.plot_stage(r["name"], history, png)
            plots.append((r["name"], str(png)))
    if histories:
        report.plot_overview(histories, out / "plots" / "overview.png")
        plots.insert(0, ("all stages", str(out / "plots" / "overview.png")))
    texts = {name: HELDOUT_SOURCES.get(name, name) for name in run.texts}
    dpo = {k: r[k] for r in records if r["kind"] == "dpo" for k in ("preferences_before", "preferences_after")
           if k in r}
    sections = [s for s in [report.context_table(rows), report.confidence_table(rows)] if s]
    if len(dpo) == 2:
        b, a = dpo["preferences_before"], dpo["preferences_after"]
        sections.append("## DPO on held-out preference pairs\n\n| | reward accuracy | reward margin |\n|---|---|---|\n"
                        f"| before DPO | {100 * b['reward_accuracy']:.1f}% | {b['reward_margin']:.4f} |\n"
                        f"| after DPO | {100 * a['reward_accuracy']:.1f}% | {a['reward_margin']:.4f} |\n\n"
                        f"{a['pairs']} pairs never trained on; reference: {c.dpo.reference}.")
    notes = [f"teacher `{c.teacher}` ({t_cfg.n_layers} layers), student mixer `{c.mixer}`, init `{c.init}`, "
             f"preset `{c.preset}`",
             f"schedule: {' → '.join(p.name for p in plan)}",
             f"stage 1 loss: {c.stage1.alpha}·CE + {c.stage1.beta}·KL ({c.stage1.kl_reduction}); DPO β "
             f"{c.dpo.beta}, reference: {c.dpo.reference}",
             "held-out texts (no stage trains on them): " + "; ".join(
                 f"{name}: {src}, first {teacher_eval[name]['tokens'] + 1} tokens" for name, src in texts.items())
             + f"; windows of {c.eval.window}",
             *data_notes(run.notes),
             "checkpoints: `final/l2m`, `final/mil` (with the tokenizer); per stage: `stages/NAME/model` (too); "
             "training logs: `stages/NAME/logs` (metrics.jsonl and TensorBoard events)", tensorboard_note(out)]
    path = report.write_report(out, title=f"zephyr_distill — {c.preset}", rows=rows, plots=plots, notes=notes,
                               sections=sections)
    write_json(out / "report.json", report.report_json(rows, preset=c.preset, heldout_texts=texts,
                                                        plan=[p.name for p in plan], dpo=dpo,
                                                        synthesis=synthesis_stats(out), data=run.notes))
    print()
    print(report.markdown_table(rows))
    print()
    say(f"report: {path} (and report.json)")
    return path
