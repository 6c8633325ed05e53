"""`python -m experiments.fidelity_ablation --groups recipe` on a tiny random teacher: MiL-order and aligned-order
arms over several rounds (stage-1 and SFT rounds), each scored after every round."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from l2m_jax.convert.hybridize import attention_layers_for

ROOT = Path(__file__).resolve().parents[1]
TINY = ["teacher=tiny-random", "data.max_prompts=6", "synth.num_requests=12", "synth.batch_size=8",
        "synth.max_new_tokens=24", "synth.require_end_of_turn=false", "synth.min_chars=1",
        "pseudo_labels.max_new_tokens=8", "eval.tokens=128", "eval.window=64", "sft.steps=2"]


def test_recipe_arms_in_mil_and_aligned_layer_order(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "abl"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.fidelity_ablation", "--preset", "smollm2", "--run", str(tmp_path / "run"),
         "--out", str(out), "--steps", "2", "--stage0-steps", "2", "--groups", "recipe", "--set", *TINY,
         "--variant", "mil", "stage1.layer_order=mil", "rounds=0.5",
         "--variant", "aligned", "stage1.layer_order=aligned", "rounds=0.5,sft:0.5,sft:0.25",
         "--variant", "kl", "stage1.layer_order=aligned_kl", "rounds=0.5",
         "--variant", "ind", "stage1.layer_order=aligned", "stage1.keep_induction=1", "stage1.teacher_cache=true",
         "rounds=0.25"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(re.findall(r"the teacher's hidden states of \d+ rows cached", done.stdout)) == 1   # the ind arm
    arms = json.loads((out / "ablation.json").read_text())["arms"]
    assert [(a["variant"], a["round"], a["kind"]) for a in arms] == [
        ("mil", 0.5, "stage1"), ("aligned", 0.5, "stage1"), ("aligned", 0.5, "sft"), ("aligned", 0.25, "sft"),
        ("kl", 0.5, "stage1"), ("ind", 0.25, "stage1")]
    n = 4                                                   # the tiny teacher's layers
    assert arms[0]["attn_layers"] == attention_layers_for(n, 0.5) and arms[0]["stage0"]
    aligned = arms[1:4]
    assert not any(a["stage0"] for a in arms[1:])           # one stage 0 over every layer, none per round
    assert len(arms[4]["attn_layers"]) == n // 2            # ranked by output KL, from the same aligned student
    # an SFT round at the stage-1 round's fraction converts nothing; it starts where that round ended
    assert aligned[1]["attn_layers"] == aligned[0]["attn_layers"] and aligned[1]["before"] == aligned[0]["after"]
    assert set(aligned[2]["attn_layers"]) < set(aligned[1]["attn_layers"])
    # keep_induction=1: the one layer left is the tiny teacher's strongest induction layer, whatever its stage-0 rank
    from experiments.distill_config import load_config
    from l2m_jax.eval.recall import induction_scores, top_induction_layers
    from l2m_jax.recipe.data import load_teacher

    t_cfg, t_params, _ = load_teacher(load_config(["preset=smollm2", *TINY])[0])
    assert arms[5]["attn_layers"] == top_induction_layers(induction_scores((t_cfg, t_params)), 1)
    for a in arms:
        assert all(v["ratio"] > 0 for v in a["after"].values()) and a["copy_nll"] > 0
    assert json.loads((out / "ablation.json").read_text())["teacher_copy_nll"] > 0
    assert "recipe: aligned SFT @ 0.25" in (out / "ablation.md").read_text()


def test_a_variant_cannot_change_what_every_arm_shares(capsys):
    import pytest

    from experiments import fidelity_ablation

    with pytest.raises(SystemExit):
        fidelity_ablation.main(["--groups", "recipe", "--variant", "bf16", "dtype=bfloat16"])
    assert "dtype is shared by every arm" in capsys.readouterr().err


def test_arms_start_from_a_runs_model_in_its_layer_order(tmp_path):
    """--start: every arm's rounds start from a saved model (here a 50% hybrid) and convert in the --run's own
    layer order with its align-all mixers (no align-all of their own), so a KD round before the 25% round
    (rounds=sft:0.5,0.25) can be set against none (rounds=0.25) on exactly the same layers."""
    import jax

    import l2m_jax
    from experiments.distill_config import load_config
    from l2m_jax.recipe.data import load_teacher

    c, _ = load_config(["preset=smollm2", *TINY])
    t_cfg, t_params, _ = load_teacher(c)
    n, order, run = t_cfg.n_layers, [2, 0, 3, 1], tmp_path / "run"
    every = l2m_jax.hybridize(t_cfg, t_params, [], "mamba2", jax.random.key(5), init="random")
    l2m_jax.save(run / "stages" / "align-all" / "model", *every, format="l2m")
    (run / "layer_order.json").write_text(json.dumps({"order": order, "metric": "nmse"}))
    keep50, keep25 = attention_layers_for(n, 0.5, order), attention_layers_for(n, 0.25, order)
    start = l2m_jax.hybridize(t_cfg, t_params, keep50, "mamba2", jax.random.key(6), init="random")
    l2m_jax.save(tmp_path / "start", *start, format="l2m")
    out = tmp_path / "abl"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.fidelity_ablation", "--preset", "smollm2", "--run", str(run),
         "--out", str(out), "--steps", "2", "--groups", "recipe", "--start", str(tmp_path / "start"),
         "--set", *TINY, "stage1.layer_order=aligned",
         "--variant", "nokd", "rounds=0.25", "--variant", "kd", "rounds=sft:0.5,0.25"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "align-all" not in done.stdout.replace(f"align-all's mixers from {run}", "")   # none run here
    arms = json.loads((out / "ablation.json").read_text())["arms"]
    assert [(a["variant"], a["round"], a["kind"]) for a in arms] == [
        ("nokd", 0.25, "stage1"), ("kd", 0.5, "sft"), ("kd", 0.25, "stage1")]
    assert arms[0]["attn_layers"] == arms[2]["attn_layers"] == keep25
    assert arms[1]["attn_layers"] == keep50                 # the KD round converts nothing
    # without the run's layer order --start cannot know which layers its model converted
    (run / "layer_order.json").unlink()
    refused = subprocess.run(
        [sys.executable, "-m", "experiments.fidelity_ablation", "--run", str(run), "--groups", "recipe",
         "--start", str(tmp_path / "start"), "--variant", "x", "rounds=0.25"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "layer_order.json, which does not exist" in refused.stderr
