"""The generic trainer: freezing, checkpoint/resume exactness, config guard, NaN guard, data sources."""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import l2m_jax
from l2m_jax.config import ModelConfig, default_ssm_config
from l2m_jax.train import losses, optim
from l2m_jax.train.loop import (ArrayBatches, CheckpointMismatchError, NonFiniteError, Trainer,
                                _batch_tokens)

V, D = 16, 8


def toy_params(seed=0):
    r = np.random.default_rng(seed)
    return {"embed": {"embedding": r.normal(size=(V, D)).astype(np.float32)},
            "layers": {0: {"mixer": {"in_proj": {"kernel": (r.normal(size=(D, D)) / 3).astype(np.float32)}},
                           "mlp_norm": {"scale": np.ones(D, np.float32)}}},
            "lm_head": {"kernel": (r.normal(size=(D, V)) / 3).astype(np.float32)}}


TOY_MASK = {"embed": {"embedding": False},
            "layers": {0: {"mixer": {"in_proj": {"kernel": True}}, "mlp_norm": {"scale": False}}},
            "lm_head": {"kernel": True}}


def toy_loss(params, batch, rng):
    layer = params["layers"][0]
    x = params["embed"]["embedding"][batch["tokens"]]                       # [B, L, D]
    x = x * (1 + jax.random.uniform(rng, ()))       # the trajectory depends on the keys (scalar: cheap to compile)
    h = jnp.tanh(x @ layer["mixer"]["in_proj"]["kernel"]) * layer["mlp_norm"]["scale"]
    logits = h @ params["lm_head"]["kernel"]                                # [B, L, V]
    loss, metrics = losses.sft_loss(logits, batch["tokens"], batch["mask"])
    if "scale" in batch:
        loss = loss * jnp.mean(batch["scale"])
    return loss, metrics


def toy_arrays(n=20, length=6, seed=0):
    r = np.random.default_rng(seed)
    return {"tokens": r.integers(0, V, (n, length)).astype(np.int32), "mask": r.random((n, length)) < 0.8}


def toy_trainer(tmp, name, config=None, mask=TOY_MASK, **kw):
    tx = optim.make_optimizer(lr=0.05, clip_norm=1.0, warmup_steps=1, total_steps=8, accum_steps=2)
    kw.setdefault("ckpt_dir", None if tmp is None else os.path.join(tmp, name))
    return Trainer(toy_loss, toy_params(), mask, tx, progress=False, rng=7,
                   config={"run": "toy"} if config is None else config, **kw)


def test_stage1_on_a_hybrid_leaves_frozen_params_bit_identical(caplog):
    cfg = ModelConfig.tiny(n_layers=2, vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64)
    cfg = cfg.replace(layer_mixers=("attention", "mamba2"), ssm=default_ssm_config(cfg, "mamba2"))
    params = l2m_jax.init_params(cfg, jax.random.key(0))
    mask = optim.trainable_mask(params, cfg, "stage1")

    def loss_fn(p, batch, rng):
        logits, _ = l2m_jax.forward(cfg, p, batch["tokens"])
        return losses.sft_loss(logits, batch["tokens"], batch["mask"])

    arrays = toy_arrays(n=4, length=12)
    arrays["tokens"] = arrays["tokens"] * 4                                 # use more of the 64-token vocab
    with caplog.at_level(logging.INFO, logger="l2m_jax.train.loop"):
        trainer = Trainer(loss_fn, params, mask, optim.make_optimizer(lr=1e-2, total_steps=2), progress=False)
    assert any("layers/1/mixer/in_proj/kernel" in r.message and "train" in r.message for r in caplog.records)
    hist = trainer.fit(ArrayBatches(arrays, batch_size=2, repeat=False), num_steps=5)
    # two batches, then the data ran out: fit stops early
    assert [h["step"] for h in hist] == [1, 2] and trainer.step == 2 and np.isfinite(hist[-1]["grad_norm"])
    after = trainer.params
    n_frozen = n_trained = 0
    for (path, before), now, m in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(after),
                                      jax.tree.leaves(mask)):
        if m:
            n_trained += 1
            assert now.dtype == jnp.float32
            assert np.any(np.asarray(now) != np.asarray(before)), f"{jax.tree_util.keystr(path)} did not move"
        else:
            n_frozen += 1
            np.testing.assert_array_equal(np.asarray(now), np.asarray(before))
    assert n_trained == 8 and n_frozen > n_trained
    # optimizer moments exist for the trainable leaves only
    mu = optax.tree_utils.tree_get(trainer.state.opt_state, "mu")
    assert len(jax.tree.leaves(mu)) == n_trained


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    tmp = str(tmp_path)
    full = toy_trainer(tmp, "full", save_every=3, max_to_keep=2, log_dir=os.path.join(tmp, "logs"))
    want = full.fit(ArrayBatches(toy_arrays(), batch_size=4, shuffle=True, seed=3), num_steps=7)
    full.close()
    assert sorted(int(d) for d in os.listdir(os.path.join(tmp, "full")) if d.isdigit()) == [6, 7]
    lines = [json.loads(x) for x in open(os.path.join(tmp, "logs", "metrics.jsonl"))]
    assert [x["step"] for x in lines] == list(range(1, 8))
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "tokens"} <= set(lines[0])

    class Crash(ArrayBatches):
        def __next__(self):
            if self.state() == {"epoch": 0, "index": 5}:                    # the 6th batch
                raise RuntimeError("killed")
            return super().__next__()

    # accum_steps=2, so the step-3 checkpoint sits mid-accumulation
    crashed = toy_trainer(tmp, "run", save_every=3)
    with pytest.raises(RuntimeError, match="killed"):
        crashed.fit(Crash(toy_arrays(), batch_size=4, shuffle=True, seed=3), num_steps=7)
    crashed.close()
    resumed = toy_trainer(tmp, "run", save_every=3)
    assert resumed.step == 3
    got = resumed.fit(ArrayBatches(toy_arrays(), batch_size=4, shuffle=True, seed=3), num_steps=7)
    assert [h["step"] for h in got] == [4, 5, 6, 7]
    np.testing.assert_array_equal([h["loss"] for h in got], [h["loss"] for h in want[3:]])
    for a, b in zip(jax.tree.leaves(resumed.trainable), jax.tree.leaves(full.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert want[3]["loss"] != want[4]["loss"]
    resumed.close()


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    tmp = str(tmp_path)
    with toy_trainer(tmp, "ck", config={"lr": 0.05, "data": "toy"}) as t:
        t.save(ArrayBatches(toy_arrays(), batch_size=4))                  # a step-0 checkpoint
    with toy_trainer(tmp, "ck", config={"lr": 0.05, "data": "toy"}) as t:
        assert t.step == 0                                                  # the same config resumes
    with pytest.raises(CheckpointMismatchError, match=r"ck.*\['lr'\]"):
        toy_trainer(tmp, "ck", config={"lr": 0.1, "data": "toy"})
    other_mask = jax.tree.map(lambda m: True, TOY_MASK)
    with pytest.raises(CheckpointMismatchError, match="structure"):
        toy_trainer(tmp, "ck", config={"lr": 0.05, "data": "toy"}, mask=other_mask)


def test_nan_guard_names_the_step_and_metric():
    arrays = toy_arrays(n=16)
    arrays["scale"] = np.ones(16, np.float32)
    arrays["scale"][8:12] = np.nan                                          # the third batch of 4
    trainer = toy_trainer(None, "")
    with pytest.raises(NonFiniteError, match="step 3: metric 'loss'"):
        trainer.fit(ArrayBatches(arrays, batch_size=4), num_steps=4)


def test_trainer_input_errors():
    with pytest.raises(ValueError, match="selects no parameters"):
        toy_trainer(None, "", mask=jax.tree.map(lambda m: False, TOY_MASK))
    trainer = toy_trainer(None, "")
    with pytest.raises(ValueError, match="no ckpt_dir"):
        trainer.save()


def test_array_batches_position_and_exhaustion():
    arrays = toy_arrays(n=10)
    a = ArrayBatches(arrays, batch_size=3, shuffle=True, seed=1)
    first = [next(a)["tokens"] for _ in range(5)]                           # crosses an epoch (3 per epoch)
    b = ArrayBatches(arrays, batch_size=3, shuffle=True, seed=1)
    [next(b) for _ in range(2)]
    state = b.state()
    c = ArrayBatches(arrays, batch_size=3, shuffle=True, seed=1)
    c.restore(json.loads(json.dumps(state)))
    for want in first[2:]:
        np.testing.assert_array_equal(next(c)["tokens"], want)
    assert not np.array_equal(first[0], first[3])                           # a new permutation per epoch
    once = ArrayBatches(arrays, batch_size=3, repeat=False)
    assert len(list(once)) == 3
    assert _batch_tokens({"tokens": np.zeros((3, 5))}) == 15
    with pytest.raises(ValueError, match="leading dimension"):
        ArrayBatches({"a": np.zeros(3), "b": np.zeros(4)}, batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        ArrayBatches({"a": np.zeros(3)}, batch_size=4)
