"""`python -m experiments.zephyr_distill` end to end on a tiny random teacher: report, checkpoints, resume, errors."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import l2m_jax

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["stage1-mamba25", "stage1-mamba50", "sft-mamba50", "dpo-mamba50"]
# the default preset with a tiny random teacher, tiny data and two steps per stage
TINY = ["preset=smollm2", "teacher=tiny-random", "progress=false", "keep_checkpoints=true", "stage1.steps=2",
        "sft.steps=2", "dpo.steps=2", "data.max_prompts=6", "data.max_sft_rows=24", "pseudo_labels.max_new_tokens=8",
        "eval.tokens=128", "eval.window=64"]


def command(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.zephyr_distill", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    done = command(*TINY, f"out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 8 and not set(cells[0]) <= {"-"} and cells[0] != "model":
            rows[cells[0]] = cells
    return rows


def test_default_preset_writes_report_plots_and_checkpoints(first_run):
    out, stdout = first_run
    assert "plan: stage1-mamba25 -> stage1-mamba50 -> sft-mamba50 -> dpo-mamba50" in stdout
    assert re.search(r"SFT data: .*dropped \d+ of \d+ examples longer than 128 tokens", stdout)
    report = (out / "report.md").read_text()
    rows = table_rows(report)
    assert list(rows) == ["teacher", "attention-initialised", *STAGES]
    for name in STAGES:
        cells = rows[name]
        assert cells[3] == "2"                                               # steps
        assert float(cells[4]) > 0 and float(cells[5]) > 1                   # final loss, perplexity
        assert 0 <= float(cells[6].rstrip("%")) <= 100                       # top-1 agreement
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(plots/{name}.png)" in report
    assert rows["stage1-mamba25"][2] == "3/4" and rows["dpo-mamba50"][2] == "2/4"
    for fmt in ("l2m", "mil"):
        cfg, _ = l2m_jax.load(out / "final" / fmt)
        assert cfg.pattern == "SASA"
        assert (out / "final" / fmt / "tokenizer.json").exists()


def test_rerun_skips_finished_stages_and_resumes_the_unfinished_one(first_run):
    out, _ = first_run
    (out / "stages" / "dpo-mamba50" / "done.json").unlink()      # as if the run died at the end of DPO
    (out / "report.md").unlink()
    again = command(*TINY, f"out={out}")
    assert again.returncode == 0, again.stderr[-3000:]
    for name in STAGES[:3]:
        assert f"{name}: finished in an earlier run, skipped" in again.stdout
    assert re.search(r"pseudo-labels: 0 generated, \d+ already on disk", again.stdout)
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
    assert not any(tmp_path.iterdir())                           # nothing was written for a refused command
