"""Optimizer, schedule and freezing against hand-written NumPy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2m_jax.config import ModelConfig, default_ssm_config
from l2m_jax.models import abstract_params
from l2m_jax.train import optim


def _hf_cosine(step, lr, warmup, total):
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_schedule_is_linear_warmup_then_cosine():
    sched = optim.make_schedule(lr=3e-4, warmup_steps=4, total_steps=20)
    got = jax.jit(jax.vmap(sched))(jnp.arange(21))
    np.testing.assert_allclose(got, [_hf_cosine(s, 3e-4, 4, 20) for s in range(21)], rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.make_schedule(lr=1.0, warmup_steps=30, total_steps=20)


def _np_adamw(params, grads_seq, *, lr_fn, b1, b2, eps, wd, clip):
    """torch-style AdamW (decoupled decay) with global-norm clipping, float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads_seq, start=1):
        norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
        scale = min(1.0, clip / norm)
        lr = lr_fn(t - 1)
        for k in p:
            gk = g[k] * scale
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk ** 2
            mhat, vhat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            p[k] = p[k] - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p[k])
    return p


def test_adamw_clip_schedule_matches_numpy_reference():
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(5)]
    kw = dict(lr=0.1, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01, clip_norm=0.5, warmup_steps=2,
              total_steps=5)
    tx = optim.make_optimizer(**kw)
    p, state = jax.tree.map(jnp.asarray, params), tx.init(params)
    update = jax.jit(tx.update)
    lrs = []
    for g in grads_seq:
        updates, state = update(g, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
        lrs.append(float(optim.current_lr(state)))
    want = _np_adamw(params, grads_seq, lr_fn=lambda s: _hf_cosine(s, 0.1, 2, 5), b1=0.9, b2=0.98, eps=1e-8,
                     wd=0.01, clip=0.5)
    for k in params:
        np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lrs, [_hf_cosine(s, 0.1, 2, 5) for s in range(5)], rtol=1e-5, atol=1e-12)


def test_gradient_accumulation_equals_mean_gradient():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    g1, g2 = ({"w": jnp.asarray(rng.normal(size=(4,)), jnp.float32)} for _ in range(2))
    kw = dict(lr=0.05, clip_norm=1.0, warmup_steps=0, total_steps=10)
    acc = optim.make_optimizer(accum_steps=2, **kw)
    state, update = acc.init(params), jax.jit(acc.update)
    u1, state = update(g1, state, params)
    np.testing.assert_array_equal(u1["w"], np.zeros(4))          # no update between micro-batches
    u2, state = update(g2, state, params)
    plain = optim.make_optimizer(**kw)
    u_ref, _ = jax.jit(plain.update)(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), plain.init(params), params)
    np.testing.assert_allclose(u2["w"], u_ref["w"], rtol=1e-6, atol=1e-9)
    assert float(jnp.abs(u2["w"]).max()) > 0


def test_stage_presets():
    assert (optim.STAGE1.lr, optim.STAGE1.betas, optim.STAGE1.clip_norm) == (8e-5, (0.9, 0.98), 0.1)
    assert (optim.STAGE1.ce_weight, optim.STAGE1.kl_weight, optim.STAGE1.weight_decay) == (1.0, 0.1, 0.0)
    assert (optim.SFT.lr, optim.SFT.betas, optim.SFT.clip_norm, optim.SFT.warmup_ratio) == (2e-5, (0.9, 0.999),
                                                                                         1.0, 0.01)
    assert (optim.DPO.lr, optim.DPO.warmup_ratio, optim.DPO.dpo_beta) == (5e-7, 0.1, 0.01)
    assert optim.SFT.warmup_for(1000) == 10 and optim.DPO.warmup_for(55) == 6
    assert optim.STAGE1.warmup_for(100_000) == 1500 and optim.STAGE1.warmup_for(1000) == 1000
    with pytest.raises(ValueError, match="exactly one"):
        optim.StagePreset(lr=1e-3)
    with pytest.raises(Exception):
        optim.SFT.lr = 1.0                                        # frozen
    tx = optim.SFT.make_optimizer(total_steps=100)
    state, update = tx.init({"w": jnp.zeros(2)}), jax.jit(tx.update)
    _, state = update({"w": jnp.ones(2)}, state, {"w": jnp.zeros(2)})
    _, state = update({"w": jnp.ones(2)}, state, {"w": jnp.zeros(2)})
    np.testing.assert_allclose(float(optim.current_lr(state)), 2e-5, rtol=1e-6, atol=0)   # warmup 1, step 1


def _hybrid_cfg(mixer):
    cfg = ModelConfig.tiny(n_layers=4, vocab_size=32, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64)
    return cfg.replace(layer_mixers=("attention", mixer, "attention", mixer), ssm=default_ssm_config(cfg, mixer))


@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
def test_stage1_mask_trains_exactly_the_mamba_mixers(mixer):
    cfg = _hybrid_cfg(mixer)
    params = abstract_params(cfg)
    mask = optim.trainable_mask(params, cfg, "stage1")
    flags = {"/".join(str(getattr(k, "key", k)) for k in path): m
             for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert set(flags) == {"/".join(str(getattr(k, "key", k)) for k in path)
                          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {name for name in flags if name.startswith(("layers/1/mixer/", "layers/3/mixer/"))}
    assert {name for name, m in flags.items() if m} == want
    assert any(n.endswith("mixer/A_log") for n in want) and "layers/1/mlp/up/kernel" in flags
    assert all(jax.tree.leaves(optim.trainable_mask(params, cfg, "sft")))
    assert all(jax.tree.leaves(optim.trainable_mask(params, cfg, "dpo")))
    both = optim.trainable_mask(params, cfg, "stage1+attention")     # every mixer, the kept attention too
    flags = {"/".join(str(getattr(k, "key", k)) for k in path): m
             for path, m in jax.tree_util.tree_flatten_with_path(both)[0]}
    assert {name for name, m in flags.items() if m} == {name for name in flags if "/mixer/" in name}
    assert flags["layers/0/mixer/q/kernel"] and not flags["layers/0/mlp/up/kernel"]


def test_mask_errors():
    cfg = ModelConfig.tiny(n_layers=2, vocab_size=32, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64)
    params = abstract_params(cfg)
    with pytest.raises(ValueError, match="no"):
        optim.trainable_mask(params, cfg, "stage1")              # all attention: nothing to distil
    with pytest.raises(ValueError, match="stage"):
        optim.trainable_mask(params, cfg, "pretrain")
    with pytest.raises(ValueError, match="layers"):
        optim.trainable_mask({"layers": {0: {}}}, cfg, "stage1")


def test_split_and_merge_round_trip():
    params = {"a": {"w": np.ones((2, 2)), "b": np.zeros(2)}, "c": np.full(3, 2.0)}
    mask = {"a": {"w": True, "b": False}, "c": False}
    trainable, frozen = optim.split_trainable(params, mask)
    assert trainable["a"]["b"] is None and trainable["c"] is None and frozen["a"]["w"] is None
    assert len(jax.tree.leaves(trainable)) == 1 and len(jax.tree.leaves(frozen)) == 2
    merged = optim.merge(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        assert x is y
    with pytest.raises(ValueError, match="structure"):
        optim.split_trainable(params, {"a": True})


def test_schedule_with_warmup_as_long_as_training():
    from l2m_jax.train.optim import make_schedule
    sched = make_schedule(lr=1.0, warmup_steps=4, total_steps=4)
    assert [float(sched(i)) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
