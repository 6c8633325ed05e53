"""`python -m experiments.zephyr_distill` end to end on a tiny random teacher: the CPU preset's whole recipe
(synthesis, stage 0, stage 1, SFT, DPO), report.md / report.json, checkpoints, resume, preset choice, errors."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import l2m_jax

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["align-mamba50", "stage1-mamba50", "sft-mamba50", "dpo-mamba50"]
# the CPU preset with a tiny random teacher, tiny data and two steps per stage; the random teacher seldom
# closes a turn, so synthesised requests need not end with one
TINY = ["teacher=tiny-random", "progress=false", "keep_checkpoints=true", "stage0.steps=2", "stage1.steps=2",
        "sft.steps=2", "dpo.steps=2", "data.max_prompts=6", "synth.num_requests=12", "synth.batch_size=8",
        "synth.max_new_tokens=24", "synth.require_end_of_turn=false", "synth.min_chars=1",
        "pseudo_labels.max_new_tokens=8", "eval.tokens=128", "eval.window=64"]


def command(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.zephyr_distill", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    done = command(*TINY, f"out={out}")          # no preset=: the machine chooses
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 14 and not set(cells[0]) <= {"-"} and cells[0] != "model":
            rows[cells[0]] = cells
    return rows


def test_cpu_preset_is_chosen_and_says_why(first_run):
    _, stdout = first_run
    assert "preset smollm2 chosen: JAX sees no GPU" in stdout and "preset=NAME overrides" in stdout


def test_whole_recipe_writes_report_plots_and_checkpoints(first_run):
    out, stdout = first_run
    assert "plan: " + " -> ".join(STAGES) in stdout
    assert re.search(r"chat data: the teacher writes 12 requests", stdout)
    assert re.search(r"stage-1 chat data: \d+ rows of 128 tokens .*0\.0% padding", stdout)
    report = (out / "report.md").read_text()
    rows = table_rows(report)
    assert list(rows) == ["teacher", "calibrated-initialised", *STAGES]
    for name in STAGES:
        cells = rows[name]
        assert cells[3] == "2"                                               # steps
        assert float(cells[4]) > 0                                           # final loss
        for ppl, ratio, agreement in (cells[5:8], cells[8:11]):
            assert float(ppl) > 1 and float(ratio) > 0 and 0 <= float(agreement.rstrip("%")) <= 100
        assert float(cells[11]) > 0                                          # copy NLL
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(plots/{name}.png)" in report
        assert list((out / "stages" / name / "logs").glob("events.out.tfevents.*")), f"{name}: no TensorBoard events"
        assert f"[{name}](stages/{name}/logs)" in report
        assert (out / "stages" / name / "model" / "tokenizer.json").exists()    # loads as a target on its own
    assert rows["align-mamba50"][2] == "2/4" and rows["dpo-mamba50"][2] == "2/4"
    assert "## DPO on held-out preference pairs" in report
    for fmt in ("l2m", "mil"):
        cfg, _ = l2m_jax.load(out / "final" / fmt)
        assert cfg.pattern == "SASA"
        assert (out / "final" / fmt / "tokenizer.json").exists()


def test_report_json_holds_the_tables_numbers(first_run):
    out, _ = first_run
    report = json.loads((out / "report.json").read_text())
    assert set(report["heldout_texts"]) == {"persuasion", "kjv-john"}
    models = {m["name"]: m for m in report["models"]}
    rows = table_rows((out / "report.md").read_text())
    for name, cells in rows.items():
        m = models[name]
        assert f"{m['evals']['persuasion']['perplexity']:.3f}" == cells[5]
        assert f"{m['ratio']['kjv-john']:.3f}" == cells[9]
        assert f"{m['copy_nll']:.3f}" == cells[11]
    # the recall probe: 8 rows of the evaluation window (64 here), the second half repeating the first
    from experiments.distill_config import load_config
    from l2m_jax.eval.recall import copy_loss
    from l2m_jax.recipe.data import load_teacher

    t_cfg, t_params, _ = load_teacher(load_config(["preset=smollm2", *TINY])[0])
    assert models["teacher"]["copy_nll"] == pytest.approx(copy_loss((t_cfg, t_params), rows=8, period=32), rel=1e-6)
    assert models["calibrated-initialised"]["copy_nll"] > 0
    teacher = models["teacher"]["evals"]["persuasion"]["perplexity"]
    dpo = models["dpo-mamba50"]
    assert dpo["ratio"]["persuasion"] == pytest.approx(dpo["evals"]["persuasion"]["perplexity"] / teacher)
    # the ratio by context length: exp(student NLL - teacher NLL) per group of the 64-token window
    t_nll, d_nll = models["teacher"]["evals"]["kjv-john"]["context_nll"], dpo["evals"]["kjv-john"]["context_nll"]
    assert list(t_nll) == ["1-15", "16-63"] and set(dpo["context_ratio"]["kjv-john"]) == set(t_nll)
    for g in t_nll:
        assert dpo["context_ratio"]["kjv-john"][g] == pytest.approx(np.exp(d_nll[g] - t_nll[g]))
    md = (out / "report.md").read_text()
    section = md[md.index("## Perplexity ratio by context length"):]
    line = next(ln for ln in section.splitlines() if ln.startswith("| dpo-mamba50 |"))
    assert f"| {dpo['context_ratio']['persuasion']['1-15']:.3f} |" in line
    assert models["teacher"]["context_ratio"]["persuasion"] == {"1-15": 1.0, "16-63": 1.0}
    # and by the teacher's confidence: the per-token numbers stay in eval/*.json, the ratios reach the report
    assert "token_nll" not in dpo["evals"]["kjv-john"] and "token_entropy" not in dpo["evals"]["kjv-john"]
    t_eval = json.loads((out / "eval" / "teacher.json").read_text())["kjv-john"]
    t_tok, t_ent = t_eval["token_nll"], t_eval["token_entropy"]
    d_tok = json.loads((out / "eval" / "dpo-mamba50.json").read_text())["kjv-john"]["token_nll"]
    from l2m_jax.eval.heldout import confidence_groups

    assert len(t_ent) == len(t_tok) == len(d_tok)
    for g, m in confidence_groups(t_ent).items():
        if m.any():
            assert dpo["confidence_ratio"]["kjv-john"][g] == pytest.approx(
                np.exp(np.asarray(d_tok)[m].mean() - np.asarray(t_tok)[m].mean()))
    assert "## Perplexity ratio by the teacher's confidence" in md
    assert set(report["dpo"]) == {"preferences_before", "preferences_after"}
    assert 0 <= report["dpo"]["preferences_after"]["reward_accuracy"] <= 1
    dec = report["data"]["decontamination"]                      # data.decontaminate=13 by default
    assert dec["ngram"] == 13
    assert {"stage-1 chat conversations", "SFT conversations", "DPO preference pairs"} <= set(dec)
    assert "decontamination: dropped what shares a 13-token span" in (out / "report.md").read_text()


def test_rerun_skips_finished_stages_and_resumes_the_unfinished_one(first_run):
    out, _ = first_run
    (out / "stages" / "dpo-mamba50" / "done.json").unlink()      # as if the run died at the end of DPO
    (out / "report.md").unlink()
    again = command(*TINY, f"out={out}")
    assert again.returncode == 0, again.stderr[-3000:]
    for name in STAGES[:3]:
        assert f"{name}: finished in an earlier run, skipped" in again.stdout
    assert "dpo-mamba50: resumed from its checkpoint at step 2" in again.stdout
    assert list(table_rows((out / "report.md").read_text()))[-1] == "dpo-mamba50"


def test_bad_commands_fail_with_clear_errors(first_run, tmp_path):
    out, _ = first_run
    changed = command(*TINY, f"out={out}", "stage1.lr=0.5")
    assert changed.returncode != 0 and "different configuration" in changed.stderr
    assert "stage1.lr: 0.001 -> 0.5" in changed.stderr
    unknown = command("stage1.stepz=2", f"out={tmp_path}")
    assert unknown.returncode == 2 and "unknown config key 'stage1.stepz'" in unknown.stderr
    assert "Did you mean" in unknown.stderr and "'steps'" in unknown.stderr
    typed = command("sft.steps=many", f"out={tmp_path}")
    assert typed.returncode == 2 and "sft.steps" in typed.stderr
    needs_teacher = command("preset=zephyr-7b", f"out={tmp_path}")
    assert needs_teacher.returncode == 2 and "needs ['teacher']" in needs_teacher.stderr
    weights = command("data.mix.chat=-1", f"out={tmp_path}")
    assert weights.returncode == 2 and "data.mix" in weights.stderr and "must be >= 0" in weights.stderr
    zero = command("data.mix.chat=0", "data.mix.text=0", f"out={tmp_path}")
    assert zero.returncode == 2 and "not all zero" in zero.stderr
    init = command("init=identity", f"out={tmp_path}")
    assert init.returncode == 2 and "init='identity'" in init.stderr
    assert not any(tmp_path.iterdir())                           # nothing was written for a refused command


def test_missing_text_source_is_named(tmp_path):
    run = command(*TINY, "data.text=[/no/such/texts]", f"out={tmp_path / 'r'}")
    assert run.returncode == 2 and "/no/such/texts" in run.stderr and "do not exist" in run.stderr


@pytest.fixture(scope="module")
def aligned_kd_run(tmp_path_factory):
    """One run for five features: the aligned layer order with the strongest induction layer kept longest, end-to-
    end KD in place of SFT, SFT rounds interleaved with the stage-1 rounds (stage1-mamba50, sft-mamba50,
    stage1-mamba75, sft-mamba75), and the teacher's hidden states cached for the stage-1 and KD steps (as the GPU
    preset runs them)."""
    out = tmp_path_factory.mktemp("aligned") / "run"
    done = command(*TINY, "stage1.layer_order=aligned", "stage1.keep_induction=1", "sft.loss=kd",
                   "dpo.enabled=false", f"out={out}", "stage1.attn_fractions=[0.5,0.25]",
                   "sft.attn_fractions=[0.5,0.25]", "sft.interleave=true", "stage1.teacher_cache=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"the teacher's hidden states of \d+ rows cached", done.stdout)
    return out


def test_end_to_end_kd_instead_of_sft_trains_every_parameter(aligned_kd_run):
    out = aligned_kd_run
    _, before = l2m_jax.load(out / "stages" / "stage1-mamba50" / "model")
    _, after = l2m_jax.load(out / "stages" / "sft-mamba50" / "model")
    record = json.loads((out / "stages" / "sft-mamba50" / "done.json").read_text())
    kept = record["attn_layers"][0]                                           # an attention layer
    layer_before, layer_after = before["layers"][kept], after["layers"][kept]
    # stage 1 froze the MLPs and the attention; end-to-end KD trains them
    assert not np.array_equal(layer_before["mlp"]["up"]["kernel"], layer_after["mlp"]["up"]["kernel"])
    assert not np.array_equal(layer_before["mixer"]["q"]["kernel"], layer_after["mixer"]["q"]["kernel"])
    assert record["kind"] == "sft" and record["final_loss"] >= 0


def test_interleaved_stage1_round_continues_from_the_sft_round_before_it(aligned_kd_run):
    out = aligned_kd_run
    plan = json.loads((out / "report.json").read_text())["plan"]
    assert plan == ["align-all", "stage1-mamba50", "sft-mamba50", "stage1-mamba75", "sft-mamba75"]
    (_, s1), (_, kd), (_, s2) = (l2m_jax.load(out / "stages" / n / "model")
                                 for n in ("stage1-mamba50", "sft-mamba50", "stage1-mamba75"))
    # stage 1 freezes the MLPs: the 25% round's are those the SFT round at 50% trained, not stage 1's
    assert len(s2["layers"]) == 4
    for i in s2["layers"]:
        up = [m["layers"][i]["mlp"]["up"]["kernel"] for m in (s1, kd, s2)]
        assert np.array_equal(up[1], up[2]) and not np.array_equal(up[0], up[2])


# ------------------------------------------------------------------------- stage-1 data, in process
def _config(seq_len=32, **data):
    from l2m_jax.recipe import RecipeConfig
    from l2m_jax.recipe.config import DataConfig

    return RecipeConfig(teacher="tiny-random", data=DataConfig(seq_len=seq_len, **data))


def _chat_rows(tok, n=8, answers=None):
    from l2m_jax.data.chat import encode_chat_prompt

    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"question {i}?"}]
        text = answers[i] if answers else f"answer {i} is a few words long."
        answer = np.asarray(tok.encode(text + "<|im_end|>", add_special_tokens=False), np.int32)
        rows.append({"messages": msgs + [{"role": "assistant", "content": text}], "finished": True, "index": i,
                     "prompt_ids": np.asarray(encode_chat_prompt(tok, msgs, where="t"), np.int32),
                     "response_ids": answer})
    return rows


def test_stage1_text_drops_a_document_with_a_13_token_heldout_span(tmp_path):
    from l2m_jax.assets import heldout_texts
    from l2m_jax.recipe.data import byte_chatml_tokenizer, distill_rows
    from l2m_jax.recipe.run import data_notes

    tok = byte_chatml_tokenizer()                      # one token per byte: a 13-token span is 13 characters
    span = heldout_texts()["persuasion"][200:213]
    assert len(tok.encode(span, add_special_tokens=False)) == 13
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("~" * 40 + span + "~" * 40)           # '~' is in no held-out text
    (docs / "b.txt").write_text("^" * 40 + span[:12] + "^" * 40)
    notes: dict = {}
    rows = distill_rows(_config(text=[str(docs)], mix={"chat": 0.0, "text": 1.0}), [], tok, notes=notes)
    stream = tok.decode(rows["tokens"].reshape(-1))
    assert "^" in stream and "~" not in stream and span[:12] in stream
    assert notes["decontamination"]["stage-1 text documents"] == {"dropped": 1, "of": 2, "tokens": 94}
    assert "1 of 2 stage-1 text documents (94 tokens)" in data_notes(notes)[0]
    kept = distill_rows(_config(text=[str(docs)], mix={"chat": 0.0, "text": 1.0}, decontaminate=0), [], tok)
    assert "~" in tok.decode(kept["tokens"].reshape(-1))


def test_stage1_repeat_source_mixes_copied_spans_of_the_text(tmp_path):
    from l2m_jax.recipe.data import byte_chatml_tokenizer, distill_rows

    tok = byte_chatml_tokenizer()
    (tmp_path / "a.txt").write_text("".join(f"line {i} of a plain text file.\n" for i in range(200)))
    text_only = distill_rows(_config(text=[str(tmp_path)], mix={"chat": 0.0, "text": 1.0}), [], tok)
    got = distill_rows(_config(text=[str(tmp_path)], mix={"chat": 0.0, "text": 1.0, "repeat": 1.0},
                               repeat_period=12), [], tok)
    t = got["tokens"]
    copied = (t[:, 12:] == t[:, :-12]).all(axis=1)
    assert 0 < copied.sum() < len(t)                  # both sources, repeat rows copy with period 12
    spans = {tuple(r[:12]) for r in text_only["tokens"]}
    assert all(tuple(r[:12]) in spans for r in t[copied]) and got["loss_mask"].all()


def test_sft_and_dpo_conversations_with_a_heldout_span_are_dropped():
    from l2m_jax.assets import heldout_texts
    from l2m_jax.recipe.data import byte_chatml_tokenizer, preference_rows, sft_rows

    tok = byte_chatml_tokenizer()
    span = heldout_texts()["kjv-john"][:13]                        # "In the beginn"
    answers = [f"answer {i} is a few words long." for i in range(8)]
    answers[3] = f"He said: {span}, said he."
    rows = _chat_rows(tok, answers=answers)
    notes: dict = {}
    sft = sft_rows(_config(), rows, tok, notes=notes)
    assert notes["decontamination"]["SFT conversations"]["dropped"] == 1
    assert span not in tok.decode(sft["tokens"].reshape(-1)) and "answer 4" in tok.decode(sft["tokens"].reshape(-1))
    train, held = preference_rows(_config(seq_len=128), rows, tok, notes=notes)     # long enough for the span
    dpo = notes["decontamination"]["DPO preference pairs"]
    assert dpo["of"] == 8 and dpo["dropped"] >= 1                  # as chosen, and wherever it is the rejected one
    pairs = [a for arrays in (train, held) if arrays is not None for k in ("chosen_tokens", "rejected_tokens")
             for a in arrays[k]]
    assert len(pairs) == 2 * (8 - dpo["dropped"]) and not any(span in tok.decode(a) for a in pairs)


def test_unavailable_prose_continues_on_chat_and_says_how_to_fix(monkeypatch, capsys):
    from l2m_jax.data import prose
    from l2m_jax.recipe.data import byte_chatml_tokenizer, distill_rows
    from l2m_jax.recipe.run import data_notes

    def no_apt(*args, **kw):
        raise prose.FetchError("missing: apt-get, dpkg-deb; fetching the texts needs a Debian-like system")

    monkeypatch.setattr(prose, "ensure_prose", no_apt)
    tok = byte_chatml_tokenizer()
    rows = _chat_rows(tok)
    notes: dict = {}
    got = distill_rows(_config(text=["prose"]), rows, tok, notes=notes)
    chat_only = distill_rows(_config(text=[]), rows, tok)
    np.testing.assert_array_equal(got["tokens"], chat_only["tokens"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "data.text=prose is unavailable" in ln)
    assert "missing: apt-get, dpkg-deb" in line and "python -m experiments.fetch_texts --out DIR" in line
    assert "data.text=[] to train on chat only" in line and "continuing with chat data only" in line
    assert notes["text_unavailable"]["error"].startswith("missing: apt-get")
    assert any("was unavailable, stage 1 trained without it" in ln for ln in data_notes(notes))


def test_check_config_accepts_prose_and_checks_decontaminate():
    from l2m_jax.recipe import UsageError, check_config

    for ok in (13, 4, 0, None):
        check_config(_config(text=["prose"], decontaminate=ok))
    for bad in (3, -1, True):
        with pytest.raises(UsageError, match=f"data.decontaminate={bad!r} must be an n-gram length >= 4"):
            check_config(_config(decontaminate=bad))


def test_check_config_repeat_source_needs_text_and_a_period_inside_the_row():
    from l2m_jax.recipe import UsageError, check_config

    check_config(_config(text=["prose"], mix={"chat": 1.0, "repeat": 1.0}, repeat_period=16))
    with pytest.raises(UsageError, match="data.mix.repeat repeats spans of data.text, which names no source"):
        check_config(_config(mix={"chat": 1.0, "repeat": 1.0}))
    for bad in (0, 32, 1.5):
        with pytest.raises(UsageError, match=f"data.repeat_period={bad!r} must be an integer in"):
            check_config(_config(text=["prose"], mix={"chat": 1.0, "repeat": 1.0}, repeat_period=bad))
    with pytest.raises(UsageError, match="unknown sources \\['copy'\\]"):
        check_config(_config(mix={"chat": 1.0, "copy": 1.0}))


def test_round_steps_give_each_stage1_round_its_own_steps():
    from l2m_jax.recipe import UsageError, check_config
    from l2m_jax.recipe.config import RecipeConfig, SftConfig, Stage1Config
    from l2m_jax.recipe.run import make_plan, stage1_round, stage_settings

    c = RecipeConfig(teacher="tiny-random", stage1=Stage1Config(attn_fractions=[0.5, 0.25], steps=7,
                                                                 round_steps=[5, 3]),
                     sft=SftConfig(attn_fractions=[0.25]))
    check_config(c)
    plan = make_plan(c, 8)
    steps = {p.name: stage_settings(c, p.kind, 100, round_index=stage1_round(c, 8, p)).steps for p in plan}
    assert steps["stage1-mamba50"] == 5 and steps["stage1-mamba75"] == 3
    assert all(n == c.stage0.steps for name, n in steps.items() if name.startswith("align-"))
    c.stage1.round_steps = None
    assert stage_settings(c, "stage1", 100, round_index=1).steps == 7
    for bad in ([5], [5, 0], [5, 2.5]):
        c.stage1.round_steps = bad
        with pytest.raises(UsageError, match="stage1.round_steps"):
            check_config(c)


def test_preference_eval_equals_dpo_metrics_over_all_pairs_at_once():
    """Batches of 2 over 5 pairs (the last one filled up) give the metrics of one DPO loss over all 5, and the
    evaluation compiles one program."""
    import jax
    import jax.numpy as jnp

    from l2m_jax.config import ModelConfig
    from l2m_jax.recipe.run import preference_eval
    from l2m_jax.train.stages import dpo_loss_fn, dpo_pair_logratios

    cfg = ModelConfig.tiny(vocab_size=40, n_layers=2)
    policy, reference = (cfg, l2m_jax.init_params(cfg, 1)), (cfg, l2m_jax.init_params(cfg, 2))
    rng = np.random.default_rng(0)
    pairs = {k: rng.integers(0, 40, (5, 12)).astype(np.int32) for k in ("chosen_tokens", "rejected_tokens")}
    pairs |= {k: np.arange(12)[None, :] >= rng.integers(2, 8, (5, 1)) for k in ("chosen_mask", "rejected_mask")}
    got = preference_eval(policy, reference, pairs, beta=0.1, batch_size=2)
    _, want = dpo_loss_fn(cfg, cfg, beta=0.1)({"policy": policy[1], "reference": reference[1]},
                                              jax.tree.map(jnp.asarray, pairs), None)
    assert got["pairs"] == 5
    for k in ("loss", "reward_margin", "reward_accuracy"):
        np.testing.assert_allclose(got[k], float(want[k]), rtol=1e-5, atol=1e-6)
    before = dpo_pair_logratios._cache_size()
    preference_eval(policy, reference, pairs, beta=0.1, batch_size=2)
    assert dpo_pair_logratios._cache_size() == before       # the same program again


def test_interleave_needs_an_sft_round_at_a_stage1_fraction():
    from l2m_jax.recipe import UsageError, check_config
    from l2m_jax.recipe.config import RecipeConfig, SftConfig, Stage1Config

    check_config(RecipeConfig(teacher="tiny-random", stage1=Stage1Config(attn_fractions=[0.5, 0.25]),
                              sft=SftConfig(attn_fractions=[0.25, 0.125], interleave=True)))
    for stage1 in (Stage1Config(attn_fractions=[0.5]), Stage1Config(attn_fractions=[0.25], stepwise=True)):
        with pytest.raises(UsageError, match="sft.interleave=true runs each SFT round right after"):
            check_config(RecipeConfig(teacher="tiny-random", stage1=stage1,
                                      sft=SftConfig(attn_fractions=[0.25], interleave=True)))


def test_compute_dtype_and_train_attention_reach_the_stages():
    from l2m_jax.recipe import UsageError, check_config
    from l2m_jax.recipe.config import RecipeConfig
    from l2m_jax.recipe.run import make_plan, stage_settings, stage_setup
    from tests.train.test_compile_ahead import FakeRun

    c = RecipeConfig(teacher="tiny-random", compute_dtype="bfloat16")
    c.stage1.train_attention = True
    check_config(c)
    run = FakeRun(c)
    stage = next(p for p in make_plan(c, run.teacher[0].n_layers) if p.kind == "stage1")
    student = l2m_jax.hybridize(*run.teacher, [0], "mamba2", jax.random.key(0))
    setup = stage_setup(c, stage, student, run.teacher, stage_settings(c, "stage1", 16))
    assert setup.config["compute_dtype"] == "bfloat16" and setup.config["trains"] == "stage1+attention"
    assert all(jax.tree.leaves(setup.mask["student"]["layers"][0]["mixer"]))     # the kept attention trains
    c.compute_dtype = "bf16"
    with pytest.raises(UsageError, match="compute_dtype='bf16'"):
        check_config(c)


def test_aligned_layer_order_ranks_layers_by_one_stage0_of_every_layer(aligned_kd_run, tmp_path):
    from l2m_jax.convert.hybridize import attention_layers_for
    from l2m_jax.train.align import keep_last

    out = aligned_kd_run
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["align-all", "sft-mamba50", "sft-mamba75",
                                                                  "stage1-mamba50", "stage1-mamba75"]
    order = json.loads((out / "layer_order.json").read_text())
    n = json.loads((out / "stages" / "align-all" / "done.json").read_text())["n_layers"]
    assert sorted(order["order"]) == list(range(n)) and len(order["nmse"]) == n
    nmse = [order["nmse"][str(i)] for i in order["ranked"]]
    assert nmse == sorted(nmse)                         # the best-reproduced layer converts first
    # stage1.keep_induction=1: the teacher's strongest induction layer moves to the end of the ranked order
    induction = {int(i): v for i, v in order["induction"].items()}
    assert order["kept_for_induction"] == [max(induction, key=induction.get)]
    assert order["order"] == keep_last(order["ranked"], order["kept_for_induction"])
    record = json.loads((out / "stages" / "stage1-mamba50" / "done.json").read_text())
    assert record["attn_layers"] == attention_layers_for(n, 0.5, order["order"])
    assert order["kept_for_induction"][0] in record["attn_layers"]
    assert "strongest induction layers" in (out / "report.md").read_text()
    bad = command(*TINY, "stage1.layer_order=aligned", "stage0.enabled=false", f"out={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "stage0.enabled=true" in bad.stderr


def test_kernel_choices_are_checked_and_set_when_a_run_starts():
    from l2m_jax.ops import attention as attn_ops
    from l2m_jax.ops import ssm as ssm_ops
    from l2m_jax.recipe import UsageError, check_config, use_kernels
    from l2m_jax.recipe.config import KernelConfig, RecipeConfig

    c = RecipeConfig(teacher="tiny-random", kernels=KernelConfig(attention="auto", decode_attention="blocked"))
    check_config(c)
    try:
        use_kernels(c)
        assert (attn_ops.ATTN_IMPL, attn_ops.DECODE_IMPL, ssm_ops.SSD_BACKEND[0]) == ("auto", "blocked", "xla")
    finally:
        use_kernels(RecipeConfig())
    assert (attn_ops.ATTN_IMPL, attn_ops.DECODE_IMPL) == ("reference", "full")
    c.kernels.attention = "flash"
    with pytest.raises(UsageError, match=r"kernels.attention='flash': choose one of \['reference', 'xla'"):
        check_config(c)
    if jax.default_backend() != "gpu":
        c.kernels = KernelConfig(ssd="pallas")
        with pytest.raises(UsageError, match="kernels.ssd='pallas' runs on a GPU only.*kernels.ssd=xla"):
            check_config(c)
