"""The whole MiL recipe: teacher -> pseudo-labels -> progressive stage 1 -> SFT rounds -> DPO -> checkpoints + report.

    python -m experiments.zephyr_distill                                  # default preset: smollm2
    python -m experiments.zephyr_distill preset=zephyr-7b teacher=/models/zephyr-7b-beta
    python -m experiments.zephyr_distill stage1.steps=8 sft.steps=8 dpo.steps=4 out=runs/quick

Settings are an OmegaConf structured config (`Config` in experiments/distill_config.py): a preset from experiments/configs/NAME.yaml
(`preset=NAME` or `--preset NAME`; a .yaml path works too) merged onto the defaults, then `key=value` overrides.
An unknown key or a badly typed value is an error. `teacher=tiny-random` builds a tiny random teacher with a
byte-level ChatML tokenizer: a test / debugging option that runs every step of the pipeline in seconds.

Everything lands in `out` (default runs/PRESET): config.yaml, pseudo_labels/, stages/NAME/{model,logs,done.json},
final/{l2m,mil}, plots/*.png and report.md. Running the same command again skips finished stages and resumes
the unfinished one from its last checkpoint; a different config for the same `out` is refused.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from experiments.distill_config import Config, UsageError, check_config, check_out_dir, load_config  # noqa: F401


# ------------------------------------------------------------------------------------------------ printing
_T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ teacher
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def byte_chatml_tokenizer():
    """Byte-level tokenizer (3 ChatML specials + 256 bytes, no merges) for the tiny random teacher."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


def load_teacher(c: DictConfig):
    """(cfg, params, tokenizer); the tokenizer must fit the teacher's vocabulary."""
    import jax

    import l2m_jax

    if c.teacher == "tiny-random":
        tok = byte_chatml_tokenizer() if c.tokenizer is None else l2m_jax.load_tokenizer(c.tokenizer)
        cfg = l2m_jax.ModelConfig.tiny(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                       max_position_embeddings=max(c.data.seq_len, c.eval.window, 256))
        return cfg, l2m_jax.init_params(cfg, jax.random.key(c.seed)), tok
    cfg, params = l2m_jax.load(c.teacher, dtype=c.dtype)
    source = c.tokenizer or c.teacher
    tok = l2m_jax.load_tokenizer(source)
    if len(tok) > cfg.vocab_size:
        raise UsageError(f"tokenizer {source!r} has {len(tok)} tokens but teacher {c.teacher!r} has a vocabulary "
                         f"of {cfg.vocab_size}: they do not belong together; use the teacher's own tokenizer")
    return cfg, params, tok


# ------------------------------------------------------------------------------------------------ data
def seed_prompts(c: DictConfig, tok) -> list:
    """Seed prompts that leave room for the answer, with a count of the ones dropped for length."""
    from l2m_jax.data.chat import encode_chat_prompt
    from l2m_jax.data.chatterbot import chatterbot_prompts
    from l2m_jax.data.sources import load_rows

    prompts: list = []
    for src in c.data.prompts:
        if src == "chatterbot":
            prompts += chatterbot_prompts()
        else:
            prompts += [r["prompt"] for r in load_rows(src, kind="prompt", limit=c.data.max_prompts)]
    prompts = prompts[:c.data.max_prompts] if c.data.max_prompts else prompts
    if not prompts:
        raise UsageError(f"data.prompts {list(c.data.prompts)} gave no prompts")
    limit = c.data.max_prompt_len or c.data.seq_len - c.pseudo_labels.max_new_tokens
    if limit < 1:
        raise UsageError(f"data.seq_len={c.data.seq_len} leaves no room for prompts next to "
                         f"pseudo_labels.max_new_tokens={c.pseudo_labels.max_new_tokens}; set data.max_prompt_len")
    keep = [p for i, p in enumerate(prompts)
            if len(encode_chat_prompt(tok, [{"role": "user", "content": p}], where=f"prompt {i}")) <= limit]
    if len(keep) < len(prompts):
        say(f"pseudo-labels: dropped {len(prompts) - len(keep)} of {len(prompts)} prompts longer than {limit} "
            "tokens (data.max_prompt_len)")
    if not keep:
        raise UsageError(f"every one of the {len(prompts)} prompts is longer than {limit} tokens; raise "
                         "data.max_prompt_len / data.seq_len")
    return keep


def pseudo_labels(c: DictConfig, out: Path, teacher, tok) -> list[dict]:
    from l2m_jax.data.pseudo_labels import generate_pseudo_labels, load_pseudo_labels
    from l2m_jax.ops.sampling import Sampling

    prompts = seed_prompts(c, tok)
    pl = c.pseudo_labels
    sampling = None if pl.temperature == 0 else Sampling(temperature=pl.temperature, top_p=pl.top_p)
    say(f"pseudo-labels: the teacher answers {len(prompts)} prompts (up to {pl.max_new_tokens} tokens each)")
    stats = generate_pseudo_labels(teacher[0], teacher[1], tok, prompts, out / "pseudo_labels",
                                   max_new_tokens=pl.max_new_tokens, batch_size=pl.batch_size, sampling=sampling,
                                   seed=c.seed, progress=c.progress)
    rows = load_pseudo_labels(out / "pseudo_labels")
    unfinished = sum(not r["finished"] for r in rows)
    say(f"pseudo-labels: {stats['generated']} generated, {stats['skipped']} already on disk; {unfinished} of "
        f"{len(rows)} answers hit max_new_tokens")
    return rows


def _padded(c: DictConfig, what: str, examples: list, pad_id: int, *, pack: bool = False) -> dict:
    from l2m_jax.data.packing import pack_sequences, pad_batch

    if pack:
        arrays, stats = pack_sequences(examples, c.data.seq_len, pad_id)
    else:
        arrays, stats = pad_batch(examples, c.data.seq_len, pad_id, truncate=c.data.truncate)
    say(f"{what} data: {stats.summary()}")
    return {k: arrays[k] for k in ("tokens", "loss_mask")}


def _label_examples(rows: list[dict]) -> list:
    import numpy as np

    return [(np.concatenate([r["prompt_ids"], r["response_ids"]]),
             np.concatenate([np.zeros(r["prompt_ids"].size, bool), np.ones(r["response_ids"].size, bool)]))
            for r in rows]


def distill_data(c: DictConfig, labels: Callable[[], list[dict]], pad_id: int) -> dict:
    return _padded(c, "stage-1", _label_examples(labels()), pad_id)


def sft_data(c: DictConfig, labels: Callable[[], list[dict]], tok, pad_id: int) -> dict:
    from l2m_jax.data.chat import encode_prompt_response
    from l2m_jax.data.chatterbot import chatterbot_rows
    from l2m_jax.data.sources import load_rows

    examples = []
    for src in c.data.sft:
        if src == "pseudo_labels":
            examples += _label_examples(labels())
            continue
        rows = chatterbot_rows() if src == "chatterbot" else load_rows(src, kind="chat", limit=c.data.max_sft_rows)
        rows = rows[:c.data.max_sft_rows] if c.data.max_sft_rows else rows
        examples += [encode_prompt_response(tok, r["messages"], where=f"{src} row {i}") for i, r in enumerate(rows)]
    if not examples:
        raise UsageError(f"data.sft {list(c.data.sft)} gave no conversations")
    return _padded(c, "SFT", examples, pad_id, pack=c.data.packing)


def dpo_data(c: DictConfig, labels: Callable[[], list[dict]], tok, pad_id: int) -> dict:
    from l2m_jax.data.chat import DataError
    from l2m_jax.data.preference import encode_preference, synthetic_preferences
    from l2m_jax.data.sources import load_rows
    from l2m_jax.train.stages import preference_arrays

    triples = []
    for src in c.data.preferences:
        if src == "synthetic":
            answered = [r for r in labels() if r["messages"][-1]["content"].strip()]
            if len(answered) < len(labels()):
                say(f"DPO data: {len(labels()) - len(answered)} pseudo-labels with an empty answer left out")
            rows = synthetic_preferences(answered, seed=c.seed, mode=c.data.synthetic_mode)
        else:
            rows = load_rows(src, kind="preference", limit=c.data.max_preference_rows)
        triples += [(src, i, r) for i, r in enumerate(rows[:c.data.max_preference_rows or None])]
    max_len = c.dpo.max_len or c.data.seq_len
    max_prompt = c.dpo.max_prompt_len or max_len // 2
    encoded, cut = [], 0
    for src, i, t in triples:
        try:
            e = encode_preference(tok, t["prompt"], t["chosen"], t["rejected"], max_len=max_len,
                                  max_prompt_len=max_prompt)
        except DataError as err:
            raise DataError(f"{src} preference row {i}: {err}") from err
        cut += e["truncated_prompt"] or e["truncated_response"]
        encoded.append(e)
    say(f"DPO data: {len(encoded)} preference pairs of at most {max_len} tokens ({cut} truncated, TRL-style)")
    return preference_arrays(encoded, max_len, pad_id)


# ------------------------------------------------------------------------------------------------ eval
def heldout_ids(c: DictConfig, tok):
    import numpy as np

    from l2m_jax.assets import heldout_text

    ids = np.asarray(tok.encode(heldout_text(), add_special_tokens=False), np.int32)[:c.eval.tokens]
    if ids.size < 2:
        raise UsageError("the held-out text gave fewer than 2 tokens")
    return ids


def evaluate(cfg, params, ids, window: int, teacher_top1=None) -> tuple[dict, Any]:   # ids int32 [T]
    """Held-out perplexity and top-1 agreement with the teacher's predictions on the same windows."""
    from l2m_jax.eval.agreement import top1_agreement, top1_predictions
    from l2m_jax.eval.perplexity import perplexity

    window = min(window, ids.size, cfg.max_position_embeddings)
    n, ppl = perplexity(cfg, params, ids, window=window)
    rows = ids.size // window
    top1 = top1_predictions(cfg, params, ids[:rows * window].reshape(rows, window))    # [N, W]
    agreement = None if teacher_top1 is None else top1_agreement(top1, teacher_top1)
    return {"perplexity": ppl, "tokens": n, "agreement": agreement}, top1


# ------------------------------------------------------------------------------------------------ stages
def stage_settings(c: DictConfig, kind: str, rows: int):
    from l2m_jax.train.optim import StagePreset
    from l2m_jax.train.stages import StageSettings

    s = c[kind]
    steps = s.steps or max(1, rows // (s.batch_size * s.accum_steps))
    preset = StagePreset(lr=s.lr, betas=tuple(s.betas), eps=s.eps, weight_decay=s.weight_decay,
                         clip_norm=s.clip_norm, warmup_steps=s.warmup_steps, warmup_ratio=s.warmup_ratio,
                         accum_steps=s.accum_steps,
                         ce_weight=s.alpha if kind == "stage1" else None,
                         kl_weight=s.beta if kind == "stage1" else None,
                         dpo_beta=s.beta if kind == "dpo" else None)
    return StageSettings(steps=steps, batch_size=s.batch_size, preset=preset, seed=c.seed,
                         save_every=c.save_every, progress=c.progress)


class Run:
    """The state of one run: its config, teacher, data (built on first use) and evaluation helpers."""

    def __init__(self, c: DictConfig, out: Path):
        import jax

        from l2m_jax import parallel
        from l2m_jax.data.chat import end_of_turn_id

        self.c, self.out = c, out
        try:
            self.mesh = parallel.make_mesh(c.mesh.data, c.mesh.fsdp)
        except ValueError as e:
            raise UsageError(f"mesh.data={c.mesh.data}, mesh.fsdp={c.mesh.fsdp}: {e}") from None
        n_dev = self.mesh.size // max(1, jax.process_count())
        for kind in ("stage1", "sft", "dpo"):
            if c[kind].batch_size % n_dev:
                raise UsageError(f"{kind}.batch_size={c[kind].batch_size} is not a multiple of the {n_dev} local "
                                 f"devices of the mesh {dict(self.mesh.shape)}")
        say(f"teacher: loading {c.teacher}")
        t_cfg, t_params, self.tok = load_teacher(c)
        self.teacher = (t_cfg, t_params)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else end_of_turn_id(self.tok)
        say(f"teacher: {t_cfg.n_layers} layers, d_model {t_cfg.d_model}, vocab {t_cfg.vocab_size}; "
            f"mesh {dict(self.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
        self.ids = heldout_ids(c, self.tok)
        self._labels = self._teacher_top1 = None
        self._data: dict[str, dict] = {}

    def labels(self) -> list[dict]:
        """The teacher's pseudo-labels, generated (or read back) on first use."""
        if self._labels is None:
            self._labels = pseudo_labels(self.c, self.out, self.teacher, self.tok)
        return self._labels

    def data(self, kind: str) -> dict:
        if kind not in self._data:
            build = {"stage1": lambda: distill_data(self.c, self.labels, self.pad_id),
                     "sft": lambda: sft_data(self.c, self.labels, self.tok, self.pad_id),
                     "dpo": lambda: dpo_data(self.c, self.labels, self.tok, self.pad_id)}[kind]
            self._data[kind] = build()
        return self._data[kind]

    def teacher_top1(self):
        """The teacher's predictions on the held-out windows (its scores go to out/eval/teacher.json)."""
        if self._teacher_top1 is None:
            result, self._teacher_top1 = evaluate(*self.teacher, self.ids, self.c.eval.window)
            _write_json(self.out / "eval" / "teacher.json", result)
        return self._teacher_top1

    def evaluate(self, name: str, cfg, params) -> dict:
        """Evaluate once; the result is kept in out/eval/NAME.json for later runs."""
        path = self.out / "eval" / f"{name}.json"
        if not path.exists():
            top1 = self.teacher_top1()
            if name != "teacher":
                _write_json(path, evaluate(cfg, params, self.ids, self.c.eval.window, top1)[0])
        return json.loads(path.read_text())


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def run_stage(run: Run, index: int, stage, student) -> tuple[dict, Any]:
    """Train one planned stage from `student` (cfg, params); saves its model, returns (done.json record, model)."""
    import jax

    import l2m_jax
    from l2m_jax.train import stages
    from l2m_jax.train.report import final_loss, read_metrics

    c, sdir = run.c, run.out / "stages" / stage.name
    s_cfg, s_params = student
    if s_cfg.attn_layers != stage.attn_layers:
        key = jax.random.fold_in(jax.random.key(c.seed), index)
        s_cfg, s_params = l2m_jax.hybridize(s_cfg, s_params, stage.attn_layers, c.mixer, key)
        if index == 0:
            init = run.evaluate("init", s_cfg, s_params)
            say(f"attention-initialised hybrid ({s_cfg.pattern}): held-out ppl {init['perplexity']:.3f}, top-1 "
                f"agreement {100 * init['agreement']:.1f}%")
    data = run.data(stage.kind)
    settings = stage_settings(c, stage.kind, len(data["tokens"] if "tokens" in data else data["chosen_tokens"]))
    say(f"{stage.name}: {len(s_cfg.ssm_layers)} of {s_cfg.n_layers} layers {c.mixer} ({s_cfg.pattern}); "
        f"{settings.steps} steps of {settings.batch_size}x{settings.preset.accum_steps} rows")
    t0 = time.perf_counter()
    dirs = dict(mesh=run.mesh, ckpt_dir=sdir / "ckpt", log_dir=sdir / "logs", config={"name": stage.name})
    if stage.kind == "stage1":
        result = stages.distill_stage((s_cfg, s_params), run.teacher, data, settings,
                                      kl_reduction=c.stage1.kl_reduction, temperature=c.stage1.temperature, **dirs)
    elif stage.kind == "sft":
        result = stages.sft_stage((s_cfg, s_params), data, settings, **dirs)
    else:
        reference = run.teacher if c.dpo.reference == "teacher" else (s_cfg, s_params)
        result = stages.dpo_stage((s_cfg, s_params), reference, data, settings, **dirs)
    if result.start_step:
        say(f"{stage.name}: resumed from its checkpoint at step {result.start_step}")
    wall = time.perf_counter() - t0
    l2m_jax.save(sdir / "model", result.cfg, result.params, format="l2m")
    scores = run.evaluate(stage.name, result.cfg, result.params)
    loss = final_loss(read_metrics(sdir / "logs" / "metrics.jsonl"))
    record = {"name": stage.name, "kind": stage.kind, "attn_layers": list(stage.attn_layers),
              "n_layers": s_cfg.n_layers, "steps": settings.steps, "final_loss": loss, "wall_s": wall, "eval": scores}
    _write_json(sdir / "done.json", record)
    if not c.keep_checkpoints:
        shutil.rmtree(sdir / "ckpt", ignore_errors=True)
    say(f"{stage.name}: done in {wall:.0f}s; final loss {loss:.4f}, held-out ppl {scores['perplexity']:.3f}, "
        f"top-1 agreement {100 * scores['agreement']:.1f}%")
    return record, (result.cfg, result.params)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("Defaults (experiments/configs/smollm2.yaml restates them):\n")
        print(OmegaConf.to_yaml(OmegaConf.structured(Config)))
        return 0
    try:
        c = load_config(argv)
        check_config(c)
        out = check_out_dir(c)
        return _run(c, out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(c: DictConfig, out: Path) -> int:
    from l2m_jax.assets import AssetError
    from l2m_jax.config import ConfigError
    from l2m_jax.data.chat import DataError
    from l2m_jax.data.tokenizer import TokenizerError
    from l2m_jax.errors import CheckpointError
    from l2m_jax.train.loop import CheckpointMismatchError
    from l2m_jax.train.stages import StageError

    logging.basicConfig(level=logging.INFO if c.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        pipeline(c, out)
    except (DataError, ConfigError, TokenizerError, CheckpointError, CheckpointMismatchError, StageError,
            AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def pipeline(c: DictConfig, out: Path) -> None:
    import l2m_jax
    from l2m_jax.train.stages import schedule

    say(f"zephyr_distill: preset {c.preset}, out {out}")
    run = Run(c, out)
    t_cfg = run.teacher[0]
    plan = schedule(t_cfg.n_layers, stage1=list(c.stage1.attn_fractions), sft=list(c.sft.attn_fractions),
                    dpo=c.dpo.enabled, stepwise=c.stage1.stepwise)
    if not plan:
        raise UsageError("nothing to train: stage1.attn_fractions and sft.attn_fractions are empty and DPO is off")
    say("plan: " + " -> ".join(p.name for p in plan))
    teacher_eval = run.evaluate("teacher", *run.teacher)
    say(f"teacher: held-out ppl {teacher_eval['perplexity']:.3f} on {teacher_eval['tokens']} tokens")
    records, student, source = [], run.teacher, None
    for i, stage in enumerate(plan):
        done = out / "stages" / stage.name / "done.json"
        if done.exists():
            records.append(json.loads(done.read_text()))
            student, source = None, out / "stages" / stage.name / "model"
            say(f"{stage.name}: finished in an earlier run, skipped")
            continue
        if student is None:
            student = l2m_jax.load(source)
        record, student = run_stage(run, i, stage, student)
        records.append(record)
        source = out / "stages" / stage.name / "model"
    export(run, lambda: student if student is not None else l2m_jax.load(source), plan[-1].name)
    write_run_report(run, plan, records, teacher_eval)


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
    _write_json(marker, {"stage": stage_name, "formats": formats})
    say(f"final model ({stage_name}, {cfg.pattern}) written to {run.out / 'final'} as {' and '.join(formats)}")


def write_run_report(run: Run, plan, records: list[dict], teacher_eval: dict) -> None:
    from l2m_jax.train import report

    c, out, t_cfg = run.c, run.out, run.teacher[0]
    rows = [report.ReportRow("teacher", "teacher", t_cfg.n_layers, t_cfg.n_layers, None, None,
                             teacher_eval["perplexity"], None, teacher_eval["tokens"])]
    init = out / "eval" / "init.json"
    if init.exists() and plan:
        e = json.loads(init.read_text())
        rows.append(report.ReportRow("attention-initialised", "init", len(plan[0].attn_layers), t_cfg.n_layers,
                                     None, None, e["perplexity"], e["agreement"], e["tokens"]))
    plots, histories = [], {}
    for r in records:
        e = r["eval"]
        rows.append(report.ReportRow(r["name"], r["kind"], len(r["attn_layers"]), r["n_layers"], r["steps"],
                                     r["final_loss"], e["perplexity"], e["agreement"], e["tokens"], r["wall_s"]))
        history = report.read_metrics(out / "stages" / r["name"] / "logs" / "metrics.jsonl")
        if history:
            histories[r["name"]] = history
            png = out / "plots" / f"{r['name']}.png"
            report.plot_stage(r["name"], history, png)
            plots.append((r["name"], str(png)))
    if histories:
        report.plot_overview(histories, out / "plots" / "overview.png")
        plots.insert(0, ("all stages", str(out / "plots" / "overview.png")))
    notes = [f"teacher `{c.teacher}` ({t_cfg.n_layers} layers), student mixer `{c.mixer}`, preset `{c.preset}`",
             f"schedule: {' → '.join(p.name for p in plan)}",
             f"stage 1 loss: {c.stage1.alpha}·CE + {c.stage1.beta}·KL ({c.stage1.kl_reduction}); DPO β "
             f"{c.dpo.beta}, reference: {c.dpo.reference}",
             f"held-out text: l2m_jax.assets.heldout_text(), first {teacher_eval['tokens'] + 1} tokens, "
             f"windows of {c.eval.window}",
             "checkpoints: `final/l2m`, `final/mil` (with the tokenizer); per stage: `stages/NAME/model`"]
    path = report.write_report(out, title=f"zephyr_distill — {c.preset}", rows=rows, plots=plots, notes=notes)
    print()
    print(report.markdown_table(rows))
    print()
    say(f"report: {path}")


if __name__ == "__main__":
    sys.exit(main())
