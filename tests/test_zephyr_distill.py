"""`python -m experiments.zephyr_distill` end to end on a tiny random teacher: the CPU preset's whole recipe
(synthesis, stage 0, stage 1, SFT, DPO), report.md / report.json, checkpoints, resume, preset choice, errors."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
        if line.startswith("|") and len(cells) == 13 and not set(cells[0]) <= {"-"} and cells[0] != "model":
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
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(plots/{name}.png)" in report
        assert list((out / "stages" / name / "logs").glob("events.out.tfevents.*")), f"{name}: no TensorBoard events"
        assert f"[{name}](stages/{name}/logs)" in report
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
    teacher = models["teacher"]["evals"]["persuasion"]["perplexity"]
    dpo = models["dpo-mamba50"]
    assert dpo["ratio"]["persuasion"] == pytest.approx(dpo["evals"]["persuasion"]["perplexity"] / teacher)
    assert set(report["dpo"]) == {"preferences_before", "preferences_after"}
    assert 0 <= report["dpo"]["preferences_after"]["reward_accuracy"] <= 1


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


def test_end_to_end_kd_instead_of_sft_trains_every_parameter(tmp_path):
    out = tmp_path / "kd"
    done = command(*TINY, "sft.loss=kd", "dpo.enabled=false", f"out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    _, before = l2m_jax.load(out / "stages" / "stage1-mamba50" / "model")
    _, after = l2m_jax.load(out / "stages" / "sft-mamba50" / "model")
    layer_before, layer_after = before["layers"][1], after["layers"][1]    # an attention layer
    # stage 1 froze the MLPs and the attention; end-to-end KD trains them
    assert not np.array_equal(layer_before["mlp"]["up"]["kernel"], layer_after["mlp"]["up"]["kernel"])
    assert not np.array_equal(layer_before["mixer"]["q"]["kernel"], layer_after["mixer"]["q"]["kernel"])
    record = json.loads((out / "stages" / "sft-mamba50" / "done.json").read_text())
    assert record["kind"] == "sft" and record["final_loss"] >= 0
