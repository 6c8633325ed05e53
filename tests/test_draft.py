"""Distilled drafts for speculative decoding (l2m_jax.recipe.draft, experiments.train_draft) on the tiny teacher."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import l2m_jax
from l2m_jax.recipe import (DraftError, acceptance, build_draft, check_compatible, decode_speed, distill_draft,
                            draft_layer_ids, load_draft, save_draft, split_heldout)

TINY = ["teacher=tiny-random", "progress=false", "data.max_prompts=12", "synth.num_requests=0", "data.text=[]",
        "pseudo_labels.max_new_tokens=8", "pseudo_labels.batch_size=12", "data.seq_len=64", "calibration_rows=2",
        "eval.tokens=128", "eval.window=64", "data.decontaminate=null"]


def _config():
    from l2m_jax.recipe import RecipeConfig
    from l2m_jax.recipe.config import DataConfig

    return RecipeConfig(teacher="tiny-random", progress=False, calibration_rows=2,
                        data=DataConfig(seq_len=64, text=[], decontaminate=None))


def _rows(tok, n=30):
    from l2m_jax.data.chat import encode_chat_prompt

    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"question {i % 20}?"}]    # prompts 0..9 come twice
        text = f"answer {i} is a few words long."
        rows.append({"messages": msgs + [{"role": "assistant", "content": text}], "finished": True, "index": i,
                     "prompt_ids": np.asarray(encode_chat_prompt(tok, msgs, where="t"), np.int32),
                     "response_ids": np.asarray(tok.encode(text + "<|im_end|>", add_special_tokens=False),
                                                np.int32)})
    return rows


@pytest.fixture(scope="module")
def setup():
    from l2m_jax.recipe import distill_rows, load_teacher

    c = _config()
    t_cfg, t_params, tok = load_teacher(c)
    train, prompts = split_heldout(_rows(tok), every=10)
    return c, (t_cfg, t_params), tok, distill_rows(c, train, tok), prompts


def test_layer_ids_are_evenly_spaced_with_the_ends():
    assert draft_layer_ids(30, 4) == [0, 9, 19, 29]
    assert draft_layer_ids(30, 2) == [0, 29]
    assert draft_layer_ids(4, 4) == [0, 1, 2, 3]
    with pytest.raises(DraftError, match="choose 2 to 30 layers"):
        draft_layer_ids(30, 1)


def test_heldout_prompts_never_train(setup):
    _, _, tok, _, _ = setup
    rows = _rows(tok)
    train, held = split_heldout(rows, every=10)
    held_keys = {tuple(p) for p in held}
    # rows 0, 10 and 20 are held out; row 20 repeats row 0's prompt, so two prompts and three rows leave
    assert len(held) == 2 and len(train) == 27
    assert all(tuple(int(t) for t in r["prompt_ids"]) not in held_keys for r in train)


@pytest.mark.parametrize("kind", ["llama", "mamba2"])
def test_draft_builds_trains_and_loads_back(setup, tmp_path, kind):
    from l2m_jax.recipe.data import calibration_tokens

    c, teacher, tok, data, _ = setup
    before = [np.array(x) for x in jax.tree.leaves(teacher[1])]
    draft = build_draft(teacher, kind, n_layers=2, calibration=calibration_tokens(c, data))
    assert draft[0].n_layers == 2 and draft[0].vocab_size == teacher[0].vocab_size
    assert set(draft[0].layer_mixers) == {"attention" if kind == "llama" else "mamba2"}
    r = distill_draft(draft, teacher, data, steps=8, batch_size=2, lr=3e-3, progress=False)
    assert r.steps == 8 and not r.stopped_by_budget
    assert r.kl_last < r.kl_first, (r.kl_first, r.kl_last)
    for a, b in zip(jax.tree.leaves(teacher[1]), before):      # training the draft leaves the teacher as it was
        np.testing.assert_array_equal(np.asarray(a), b)
    path = save_draft(tmp_path / kind, (r.cfg, r.params), tok)
    cfg, params = load_draft(path, teacher[0], tok)
    assert cfg == r.cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(r.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(l2m_jax.load_tokenizer(path)) == len(tok)


def test_wall_clock_budget_stops_training_cleanly(setup):
    _, teacher, _, data, _ = setup
    draft = build_draft(teacher, "llama", n_layers=2)
    r = distill_draft(draft, teacher, data, seconds=0.05, batch_size=2, progress=False)
    assert r.stopped_by_budget and r.steps == 1      # the first step starts inside the budget, none after it


def test_acceptance_is_a_rate_and_speculative_equals_greedy(setup):
    _, teacher, tok, _, prompts = setup
    draft = build_draft(teacher, "llama", n_layers=2)
    table = acceptance(teacher, draft, prompts, ks=(1, 3), max_new_tokens=6)
    assert sorted(table) == [1, 3]
    for k, row in table.items():
        assert 0.0 <= row["acceptance_rate"] <= 1.0
        assert 1.0 <= row["tokens_per_call"] <= k + 1
        assert row["greedy_match"] == 1.0 and row["target_calls"] >= 1
        assert row["divergence_gaps"] == []


def test_divergence_gaps_are_the_targets_logit_gap_where_two_outputs_part(setup):
    from l2m_jax.infer.generate import generate
    from l2m_jax.recipe.draft import divergence_gaps

    _, teacher, _, _, prompts = setup
    prompts = [prompts[0], prompts[-1]]
    greedy = generate(*teacher, prompts, 5)
    other = [list(g) for g in greedy]
    p, ref = prompts[1], list(greedy[1])
    logits = np.asarray(l2m_jax.forward(*teacher, np.asarray([list(p) + ref[:2]], np.int32))[0][0, -1], np.float64)
    runner_up = int(np.argsort(-logits)[1])
    other[1] = ref[:2] + [runner_up, 0, 0]          # parts from greedy at its third token
    other[0] = list(greedy[0])[:3]                   # stops early: no choice between two tokens
    gaps = divergence_gaps(teacher, prompts, greedy, other)
    assert len(gaps) == 2 and gaps[0] == float("inf")
    np.testing.assert_allclose(gaps[1], logits[ref[2]] - logits[runner_up], rtol=1e-4, atol=1e-5)
    assert gaps[1] >= 0
    assert divergence_gaps(teacher, prompts, greedy, greedy) == []


def test_decode_speed_times_plain_and_speculative_per_batch_size(setup):
    _, teacher, _, _, prompts = setup
    draft = build_draft(teacher, "llama", n_layers=2)
    table = decode_speed(teacher, draft, prompts, ks=(2,), max_new_tokens=5, batch_sizes=(1, 2), reps=1)
    assert sorted(table) == [1, 2]
    assert table[2]["prompts"] == len(prompts) // 2 * 2 and table[1]["prompts"] == len(prompts)
    for entry in table.values():
        assert entry["plain_tokens_per_s"] > 0 and entry[2]["tokens_per_s"] > 0
        assert entry[2]["speedup"] == pytest.approx(entry[2]["tokens_per_s"] / entry["plain_tokens_per_s"])
        assert 0 <= entry[2]["acceptance_rate"] <= 1 and 1 <= entry[2]["tokens_per_call"] <= 3
    # the same acceptance as the acceptance table: both decode the same prompts greedily
    assert table[1][2]["acceptance_rate"] == acceptance(teacher, draft, prompts, ks=(2,), max_new_tokens=5)[2][
        "acceptance_rate"]
    with pytest.raises(DraftError, match="batch size 0"):
        decode_speed(teacher, draft, prompts, batch_sizes=(0,))


# ------------------------------------------------------------------------------------------------ bad input
def test_k_past_the_context_is_refused_naming_the_model(setup):
    from l2m_jax.infer.speculative import check_speculative_fits

    _, teacher, _, _, _ = setup
    limit = teacher[0].max_position_embeddings
    prompt = [[5] * (limit - 20)]
    with pytest.raises(DraftError, match=r"k=16 does not fit the context of target 'T'.*use k <= 11"):
        acceptance(teacher, teacher, prompt, ks=(2, 16), max_new_tokens=8, target_name="target 'T'")
    check_speculative_fits(teacher[0], limit - 20, 8, 11)          # exactly fits
    with pytest.raises(ValueError, match="even k=1 does not fit: lower max_new_tokens to at most 18"):
        check_speculative_fits(teacher[0], limit - 20, 40, 1, model="the draft")
    mamba = l2m_jax.hybridize(teacher[0], teacher[1], [], "mamba2")[0]
    check_speculative_fits(mamba, limit, 100, 8)                     # no attention: no limit


def _other_tokenizer():
    """The tiny byte tokenizer with its special tokens in another order: same size, other ids."""
    from l2m_jax.recipe.data import byte_chatml_tokenizer

    return byte_chatml_tokenizer(specials=("<|im_end|>", "<|im_start|>", "<|endoftext|>"))


def test_a_draft_of_another_vocabulary_or_tokenizer_is_refused(setup, tmp_path):
    _, teacher, tok, _, _ = setup
    small = l2m_jax.ModelConfig.tiny(vocab_size=100)
    with pytest.raises(DraftError, match="draft 'D' has a vocabulary of 100 tokens but target 'T' has 259"):
        check_compatible(teacher[0], tok, small, tok, target="target 'T'", draft="draft 'D'")
    draft = build_draft(teacher, "llama", n_layers=2)
    path = save_draft(tmp_path / "other", draft, _other_tokenizer())
    with pytest.raises(DraftError, match=f"tokenizer saved beside draft '{path}' differs .*specials"):
        load_draft(path, teacher[0], tok)


# ------------------------------------------------------------------------------------------------ command
def test_command_end_to_end_and_generate_loads_the_draft(setup, tmp_path, capsys):
    from experiments import train_draft
    from experiments.distill_config import check_out_dir, load_config
    from l2m_jax.generate import _load_draft, resolve_tokenizer

    _, teacher, tok, _, _ = setup
    target = tmp_path / "target"
    l2m_jax.save(target, *teacher, format="l2m")
    tok.save_pretrained(target)
    run_dir, out = tmp_path / "run", tmp_path / "draft"
    with pytest.raises(SystemExit, match="2"):                       # argparse: --run or --preset, not both
        train_draft.main(["--run", str(run_dir), "--preset", "smollm2"])
    assert train_draft.main(["--run", str(run_dir)]) == 1 and "no config.yaml there" in capsys.readouterr().err
    # a zephyr_distill run folder (its config.yaml) without chat data yet: the teacher makes it there
    c, _ = load_config(["preset=smollm2", f"out={run_dir}", *TINY])
    check_out_dir(c)
    rc = train_draft.main(["--run", str(run_dir), "--kind", "llama", "--layers", "2", "--steps", "3",
                           "--batch", "2", "--k", "2", "--max-new", "4", "--eval-prompts", "2",
                           "--target", str(target), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    record = json.loads((out / "draft.json").read_text())
    assert record["training"]["steps"] == 3 and record["settings"]["layer_ids"] == [0, 3]
    after = record["acceptance"]["after"]["2"]
    assert 0 <= after["acceptance_rate"] <= 1 and after["greedy_match"] == 1.0
    assert "| 2 |" in printed and (run_dir / "chat" / "answers").exists()
    assert "K=2: acceptance" in printed                              # each K reported as it is measured
    # what `python -m l2m_jax.generate --model TARGET --draft OUT` loads (and checks against the target)
    d_cfg, _ = _load_draft(str(out), teacher[0], resolve_tokenizer(str(target)), None)
    assert d_cfg.n_layers == 2
    # the saved draft measured as it is, without the untrained pass
    again = tmp_path / "again"
    rc = train_draft.main(["--run", str(run_dir), "--draft", str(out), "--steps", "0", "--no-before", "--k", "2",
                           "--max-new", "4", "--eval-prompts", "2", "--target", str(target), "--out", str(again),
                           "--speed", "1,2", "--speed-reps", "1"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    record = json.loads((again / "draft.json").read_text())
    assert sorted(record["decode_speed"]) == ["1", "2"] and record["decode_speed"]["2"]["2"]["tokens_per_s"] > 0
    assert "| 2 | 2 |" in printed and "wall-clock greedy decoding" in printed
    assert record["acceptance"]["before"] is None and record["training"] is None
    assert record["acceptance"]["after"]["2"]["acceptance_rate"] == after["acceptance_rate"]


def test_the_trained_draft_is_saved_before_it_is_measured(setup, tmp_path, monkeypatch):
    import l2m_jax.recipe
    from experiments import train_draft
    from experiments.distill_config import check_out_dir, load_config

    run_dir, out = tmp_path / "run", tmp_path / "draft"
    c, _ = load_config(["preset=smollm2", f"out={run_dir}", *TINY])
    check_out_dir(c)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("stopped while measuring")

    monkeypatch.setattr(l2m_jax.recipe, "acceptance", stopped)
    with pytest.raises(KeyboardInterrupt):
        train_draft.main(["--run", str(run_dir), "--kind", "llama", "--layers", "2", "--steps", "2", "--batch", "2",
                          "--no-before", "--k", "2", "--max-new", "4", "--eval-prompts", "2", "--out", str(out)])
    record = json.loads((out / "draft.json").read_text())
    assert record["training"]["steps"] == 2 and record["acceptance"]["after"] is None
    cfg, _ = l2m_jax.load(out)
    assert cfg.n_layers == 2 and (out / "tokenizer.json").exists()


def test_command_refuses_a_draft_without_a_tokenizer(setup, tmp_path, capsys):
    from experiments import train_draft

    _, teacher, _, _, _ = setup
    bare = tmp_path / "bare"
    l2m_jax.save(bare, *build_draft(teacher, "llama", n_layers=2), format="l2m")
    rc = train_draft.main(["--preset", "smollm2", "--draft", str(bare), "--steps", "0", "--data", "chatterbot",
                           f"out={tmp_path / 'run'}", *TINY])
    err = capsys.readouterr().err
    assert rc == 1 and f"draft '{bare}' has no tokenizer beside it" in err, err
    run_dir = tmp_path / "run"
    (run_dir / "config.yaml").parent.mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text("preset: smollm2\n")
    assert train_draft.main(["--preset", "smollm2", "--out", str(run_dir), f"out={run_dir}", *TINY]) == 1
    assert "is (or holds) a run folder" in capsys.readouterr().err
