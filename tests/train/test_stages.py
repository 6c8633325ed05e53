"""The three stages end to end on a tiny random teacher, the progressive schedule, and the stages' input errors."""
import jax
import numpy as np
import pytest

import l2m_jax
from l2m_jax.config import ModelConfig
from l2m_jax.data.chat import encode_prompt_response
from l2m_jax.data.packing import pad_batch
from l2m_jax.data.preference import encode_preference, synthetic_preferences
from l2m_jax.train import optim
from l2m_jax.train.stages import (StageError, StageSettings, computing_in, distill_setup,
                                  distill_stage, dpo_stage, preference_arrays, schedule, sft_stage)
from tests.data import tiny_chatml_tokenizer

L = 48
CONVERSATIONS = [[{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": f"{a + b} it is"}]
                 for a, b in
                 [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_chatml_tokenizer()
    cfg = ModelConfig.tiny(vocab_size=len(tok), max_position_embeddings=64)
    params = l2m_jax.init_params(cfg, jax.random.key(0))
    rows, stats = pad_batch([encode_prompt_response(tok, m) for m in CONVERSATIONS], L, pad_id=0)
    assert stats.dropped == 0
    triples = synthetic_preferences([{"messages": m} for m in CONVERSATIONS], seed=0)
    pairs = preference_arrays([encode_preference(tok, t["prompt"], t["chosen"], t["rejected"], max_len=L,
                                                 max_prompt_len=L // 2) for t in triples], L, pad_id=0)
    return tok, (cfg, params), {k: rows[k] for k in ("tokens", "loss_mask")}, pairs


def settings(kind, **kw):
    preset = {"stage1": optim.STAGE1, "sft": optim.SFT, "dpo": optim.DPO}[kind]
    preset = preset.replace(lr=1e-2, warmup_steps=0, warmup_ratio=None, **kw)
    return StageSettings(steps=2, batch_size=2, preset=preset, progress=False)


def changed(a, b) -> bool:
    return bool(np.any(np.asarray(a) != np.asarray(b)))


def test_schedule_follows_mil_layer_sets():
    plan = schedule(32, stage1=(0.75, 0.5), sft=(0.5, 0.25, 0.125, 0.0), dpo=True)
    assert [p.name for p in plan] == ["stage1-mamba25", "stage1-mamba50", "sft-mamba50", "sft-mamba75",
                                      "sft-mamba87.5", "sft-mamba100", "dpo-mamba100"]
    assert [p.kind for p in plan] == ["stage1", "stage1", "sft", "sft", "sft", "sft", "dpo"]
    assert plan[0].attn_layers == tuple(i for i in range(32) if i % 4)
    assert plan[1].attn_layers == plan[2].attn_layers == tuple(range(1, 32, 2))
    assert plan[3].attn_layers == tuple(range(3, 32, 4))
    assert plan[4].attn_layers == (7, 15, 23, 31)
    assert plan[5].attn_layers == plan[6].attn_layers == ()
    # stepwise: one more layer per round, in MiL's order, ending on the 50% layer set
    steps = schedule(8, stage1=(0.5,), sft=(), dpo=False, stepwise=True)
    assert [p.name for p in steps] == ["stage1-step01", "stage1-step02", "stage1-step03", "stage1-step04"]
    assert [sorted(set(range(8)) - set(p.attn_layers)) for p in steps] == [[0], [0, 2], [0, 2, 4], [0, 2, 4, 6]]
    with pytest.raises(StageError, match="decreasing"):
        schedule(8, stage1=(0.5, 0.75), sft=())
    with pytest.raises(StageError, match="same attention fraction"):
        schedule(8, stage1=(0.5,), sft=(0.5, 0.5))
    with pytest.raises(StageError, match="needs a hybrid"):
        schedule(8, stage1=(), sft=(), dpo=True)


def test_interleaved_schedule_puts_each_sft_round_after_its_stage1_round():
    plan = schedule(8, stage1=(0.5, 0.25), sft=(0.5, 0.25, 0.0), dpo=True, interleave=True)
    assert [p.name for p in plan] == ["stage1-mamba50", "sft-mamba50", "stage1-mamba75", "sft-mamba75",
                                      "sft-mamba100", "dpo-mamba100"]
    assert plan[0].attn_layers == plan[1].attn_layers == (1, 3, 5, 7)
    assert plan[2].attn_layers == plan[3].attn_layers == (3, 7)
    assert plan[4].attn_layers == ()
    # the same rounds without interleave: every SFT round after the last stage-1 round
    assert [p.name for p in schedule(8, stage1=(0.5, 0.25), sft=(0.25, 0.0), dpo=False)] == [
        "stage1-mamba50", "stage1-mamba75", "sft-mamba75", "sft-mamba100"]
    # an SFT fraction above a later stage-1 round's is still refused as a layer turning back to attention
    with pytest.raises(StageError, match="already made Mamba"):
        schedule(8, stage1=(0.5, 0.25), sft=(0.25, 0.375), dpo=False, interleave=True)
    with pytest.raises(StageError, match="share none"):
        schedule(8, stage1=(0.5,), sft=(0.25,), interleave=True)


def test_three_stages_end_to_end(setup, tmp_path):
    tok, teacher, rows, pairs = setup
    t_cfg, t_params = teacher
    plan = schedule(t_cfg.n_layers, stage1=(0.75, 0.5), sft=(0.5,))
    s_cfg, s_params = l2m_jax.hybridize(t_cfg, t_params, plan[0].attn_layers, "mamba2", jax.random.key(1))
    assert s_cfg.pattern == "SAAA"

    r1 = distill_stage((s_cfg, s_params), teacher, rows, settings("stage1", kl_weight=1.0),
                       ckpt_dir=tmp_path / "s1", log_dir=tmp_path / "s1log")
    assert len(r1.history) == 2 and all(np.isfinite([h["loss"], h["ce"], h["kl"]]).all() for h in r1.history)
    assert r1.history[0]["kl"] > 0                            # a freshly converted layer disagrees with the teacher
    new, old = r1.params["layers"][0], s_params["layers"][0]
    assert changed(new["mixer"]["in_proj"]["kernel"], old["mixer"]["in_proj"]["kernel"])
    frozen = [("mlp", "up", "kernel"), ("attn_norm", "scale"), ("mlp_norm", "scale")]
    for path in frozen:                                       # MLPs and block norms stay frozen in stage 1
        a, b = new, old
        for k in path:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(r1.params["layers"][1]["mixer"]["q"]["kernel"]),
                                  np.asarray(s_params["layers"][1]["mixer"]["q"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(r1.params["embed"]["embedding"]),
                                  np.asarray(s_params["embed"]["embedding"]))

    # round 2 re-hybridizes the round-1 model: layer 0 keeps its distilled mixer, layer 2 starts from attention
    c2, p2 = l2m_jax.hybridize(r1.cfg, r1.params, plan[1].attn_layers, "mamba2", jax.random.key(2))
    assert c2.pattern == "SASA"
    np.testing.assert_array_equal(np.asarray(p2["layers"][0]["mixer"]["in_proj"]["kernel"]),
                                  np.asarray(new["mixer"]["in_proj"]["kernel"]))
    d_in, d_xb = c2.ssm.d_inner, c2.ssm.d_xb
    np.testing.assert_array_equal(np.asarray(p2["layers"][2]["mixer"]["in_proj"]["kernel"][:, d_in:d_in + d_xb]),
                                  np.asarray(r1.params["layers"][2]["mixer"]["v"]["kernel"]))

    r2 = sft_stage((c2, p2), rows, settings("sft"), ckpt_dir=tmp_path / "sft")
    assert len(r2.history) == 2 and np.isfinite(r2.history[-1]["loss"]) and r2.start_step == 0
    assert changed(r2.params["embed"]["embedding"], p2["embed"]["embedding"])
    assert changed(r2.params["layers"][1]["mlp"]["down"]["kernel"], p2["layers"][1]["mlp"]["down"]["kernel"])
    # the same call again resumes at the end of the finished stage: no step runs, the same weights come back
    again = sft_stage((c2, p2), rows, settings("sft"), ckpt_dir=tmp_path / "sft")
    assert again.start_step == 2 and again.history == []
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(r2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    r3 = dpo_stage((r2.cfg, r2.params), teacher, pairs, settings("dpo", dpo_beta=0.5))
    h = r3.history
    assert len(h) == 2 and np.isfinite([x["loss"] for x in h]).all()
    assert {"reward_margin", "reward_accuracy"} <= set(h[0])
    assert changed(r3.params["layers"][0]["mixer"]["in_proj"]["kernel"],
                   r2.params["layers"][0]["mixer"]["in_proj"]["kernel"])
    assert jax.tree.structure(r3.params) == jax.tree.structure(r2.params)


def test_stage_input_errors(setup):
    tok, teacher, rows, pairs = setup
    t_cfg, t_params = teacher
    s_cfg, s_params = l2m_jax.hybridize(t_cfg, t_params, [1, 2, 3], "mamba2", jax.random.key(1))
    other = ModelConfig.tiny(vocab_size=t_cfg.vocab_size + 8)
    with pytest.raises(StageError, match="vocabulary"):
        distill_stage((s_cfg, s_params), (other, None), rows, settings("stage1"))
    empty = {k: v[:0] for k, v in rows.items()}
    with pytest.raises(StageError, match="empty"):
        sft_stage((s_cfg, s_params), empty, settings("sft"))
    with pytest.raises(StageError, match="batch_size=8 exceeds"):
        sft_stage((s_cfg, s_params), rows, StageSettings(steps=1, batch_size=8, preset=optim.SFT))
    bad = dict(rows, tokens=rows["tokens"] + t_cfg.vocab_size)
    with pytest.raises(StageError, match="tokenizer"):
        sft_stage((s_cfg, s_params), bad, settings("sft"))
    with pytest.raises(StageError, match="lacks"):
        dpo_stage((s_cfg, s_params), teacher, rows, settings("dpo"))


def test_kd_distills_a_shrunk_draft_with_every_parameter_training(setup):
    from l2m_jax.infer.speculative import shrink

    _, teacher, rows, _ = setup
    d_cfg, d_params = shrink(*teacher, [0, 3])
    r = distill_stage((d_cfg, d_params), teacher, rows, settings("stage1", kl_weight=1.0), trains="kd")
    assert all(np.isfinite(h["loss"]) for h in r.history)
    moved = jax.tree.map(changed, r.params, d_params)
    assert all(jax.tree.leaves(moved))                    # embeddings, MLPs, norms, attention: everything trains
    with pytest.raises(ValueError, match="cfg has none"):  # stage 1 needs Mamba mixers to train
        distill_stage((d_cfg, d_params), teacher, rows, settings("stage1"))
    with pytest.raises(StageError, match="trains='all'"):
        distill_stage((d_cfg, d_params), teacher, rows, settings("stage1"), trains="all")


def test_compute_dtype_is_mixed_precision(setup):
    """compute_dtype="bfloat16": the forward passes run in bf16 while the params (fp32) and the loss stay as
    they were; the loss is the fp32 one to bf16 accuracy, and the trained model keeps its own cfg."""
    _, teacher, rows, _ = setup
    t_cfg, t_params = teacher
    student = l2m_jax.hybridize(t_cfg, t_params, [1, 3], "mamba2", jax.random.key(1))
    s = settings("stage1", kl_weight=1.0)
    setup32, setup16 = (distill_setup(student, teacher, s, compute_dtype=d) for d in (None, "bfloat16"))
    batch = {k: v[:2] for k, v in rows.items()}
    (l32, _), (l16, m16) = (jax.jit(st.make_loss())(st.params, batch, None) for st in (setup32, setup16))
    assert l16.dtype == np.float32 and m16["loss"].dtype == np.float32
    assert abs(float(l16) - float(l32)) < 0.02 * abs(float(l32)) and float(l16) != float(l32)
    g = jax.jit(jax.grad(lambda p: setup16.make_loss()(dict(setup16.params, student=p), batch, None)[0]))(student[1])
    assert {x.dtype for x in jax.tree.leaves(g)} == {np.dtype(np.float32)}      # fp32 gradients for fp32 params
    assert setup16.cfg == student[0] and setup16.config["compute_dtype"] == "bfloat16"
    assert "compute_dtype" not in setup32.config          # the default leaves older checkpoints' config alone
    r = distill_stage(student, teacher, rows, s, compute_dtype="bfloat16", trains="stage1+attention")
    assert r.cfg == student[0] and all(np.isfinite(h["loss"]) for h in r.history)
    moved = jax.tree.map(changed, r.params["layers"][0], student[1]["layers"][0])   # layer 0 keeps attention
    assert all(jax.tree.leaves(moved["mixer"])) and not any(jax.tree.leaves(moved["mlp"]))
    assert computing_in(t_cfg, None) is t_cfg
    with pytest.raises(StageError, match="compute_dtype='int8'"):
        computing_in(t_cfg, "int8")
