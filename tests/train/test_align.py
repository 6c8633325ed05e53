"""Stage 0 (layer-wise alignment): its loss against an independent NumPy computation, training, errors."""
import jax
import numpy as np
import pytest

import l2m_jax
from l2m_jax.config import ModelConfig
from l2m_jax.convert.hybridize import attention_layers_for, hybridize
from l2m_jax.train.align import (align_loss_fn, align_stage, aligned_layers, conversion_order, keep_last, layer_kl,
                                 layer_nmse, precompile_layer_scores, take_mixers)
from l2m_jax.train.optim import StagePreset
from l2m_jax.train.stages import StageError, StageSettings, schedule

TEACHER = ModelConfig.tiny(n_heads=8, n_kv_heads=4, head_dim=8)
KEEP = [1, 3]


@pytest.fixture(scope="module")
def models():
    t = (TEACHER, l2m_jax.init_params(TEACHER, 0))
    calib = np.random.default_rng(1).integers(0, TEACHER.vocab_size, (2, 16))
    s = hybridize(*t, KEEP, "mamba2", jax.random.key(3), init="calibrated", calibration=calib)
    return t, s


# ------------------------------------------------------------------------------------------------ NumPy
def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, theta):                       # x [L, H, P], rotate-half
    l, _, p = x.shape
    inv = 1.0 / theta ** (np.arange(0, p, 2) / p)
    ang = np.arange(l)[:, None] * inv[None]                                  # [L, P/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :p // 2], x[..., p // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _attention(cfg, a, u):                 # u [L, D] -> [L, D]
    l = u.shape[0]
    q = _rope((u @ a["q"]["kernel"]).reshape(l, cfg.n_heads, cfg.head_dim), cfg.rope_theta)
    k = _rope((u @ a["k"]["kernel"]).reshape(l, cfg.n_kv_heads, cfg.head_dim), cfg.rope_theta)
    v = (u @ a["v"]["kernel"]).reshape(l, cfg.n_kv_heads, cfg.head_dim)
    r = cfg.n_heads // cfg.n_kv_heads
    out = np.zeros((l, cfg.n_heads, cfg.head_dim))
    for h in range(cfg.n_heads):
        s = q[:, h] @ k[:, h // r].T / np.sqrt(cfg.head_dim)
        s = np.where(np.tril(np.ones((l, l), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (w / w.sum(-1, keepdims=True)) @ v[:, h // r]
    return out.reshape(l, -1) @ a["o"]["kernel"]


def _silu(x):
    return x / (1 + np.exp(-x))


def _mamba2(cfg, m, u):                    # u [L, D] -> [L, D], the recurrence one step at a time
    s = cfg.ssm
    l = u.shape[0]
    zxbcdt = u @ m["in_proj"]["kernel"]
    z, xbc, dt = zxbcdt[:, :s.d_inner], zxbcdt[:, s.d_inner:s.d_inner + s.conv_dim_mamba2], zxbcdt[:, -s.n_heads:]
    w = m["conv"]["kernel"]                                                    # [W, C]
    pad = np.concatenate([np.zeros((s.d_conv - 1, xbc.shape[1])), xbc])
    xbc = _silu(np.stack([m["conv"]["bias"] + np.sum(w * pad[t:t + s.d_conv], 0) for t in range(l)]))
    g, r = s.d_xb // s.head_dim, s.n_heads // (s.d_xb // s.head_dim)
    x = xbc[:, :s.d_xb].reshape(l, g, s.head_dim)
    B = xbc[:, s.d_xb:2 * s.d_xb].reshape(l, g, s.d_state)
    C = xbc[:, 2 * s.d_xb:].reshape(l, s.n_heads, s.d_state)
    delta = np.log1p(np.exp(dt + m["dt_bias"]))                               # [L, H]
    A = -np.exp(m["A_log"])
    y = np.zeros((l, s.n_heads, s.head_dim))
    for h in range(s.n_heads):
        state = np.zeros((s.head_dim, s.d_state))
        for t in range(l):
            state = np.exp(delta[t, h] * A[h]) * state + delta[t, h] * np.outer(x[t, h // r], B[t, h // r])
            y[t, h] = state @ C[t, h] + m["D"][h] * x[t, h // r]
    gated = (y.reshape(l, -1) * _silu(z)).reshape(l, s.n_heads, s.head_dim)
    normed = gated / np.sqrt(np.mean(gated ** 2, -1, keepdims=True) + s.norm_eps)
    return (normed.reshape(l, -1) * m["norm"]["scale"]) @ m["out_proj"]["kernel"]


def _stage0_loss_np(t_cfg, t_params, s_cfg, s_params, tokens, mask):
    tp, sp = _np(t_params), _np(s_params)
    layers = [i for i, k in enumerate(s_cfg.layer_mixers) if k != "attention"]
    terms = {i: [] for i in layers}
    for row, m in zip(tokens, mask):
        x = tp["embed"]["embedding"][row]
        for i in range(t_cfg.n_layers):
            lp = tp["layers"][i]
            u = _rms(x, lp["attn_norm"]["scale"], t_cfg.rms_eps)
            a = _attention(t_cfg, lp["mixer"], u)
            if i in layers:
                terms[i].append((_mamba2(s_cfg, sp["layers"][i]["mixer"], u)[m], a[m]))
            x = x + a
            v = _rms(x, lp["mlp_norm"]["scale"], t_cfg.rms_eps)
            x = x + (_silu(v @ lp["mlp"]["gate"]["kernel"]) * (v @ lp["mlp"]["up"]["kernel"])) @ lp["mlp"]["down"]["kernel"]
    nmse = []
    for i in layers:
        pred = np.concatenate([p for p, _ in terms[i]])
        target = np.concatenate([t for _, t in terms[i]])
        nmse.append(np.mean((pred - target) ** 2) / np.var(target))
    return float(np.mean(nmse)), nmse


def _rows(seed, rows, length, cut):
    """Random tokens [rows, length] and a mask whose last row is real up to `cut`."""
    tokens = np.random.default_rng(seed).integers(0, TEACHER.vocab_size, (rows, length)).astype(np.int32)
    mask = np.ones(tokens.shape, bool)
    mask[-1, cut:] = False
    return tokens, mask


def test_stage0_loss_equals_numpy(models):
    (t_cfg, t_params), (s_cfg, s_params) = models
    tokens, mask = _rows(2, 2, 12, 9)
    loss, metrics = align_loss_fn(s_cfg, t_cfg, aligned_layers(s_cfg, t_cfg))(
        {"student": s_params, "teacher": t_params}, {"tokens": tokens, "loss_mask": mask}, None)
    want, per_layer = _stage0_loss_np(t_cfg, t_params, s_cfg, s_params, tokens, mask)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    np.testing.assert_allclose([float(metrics["nmse_layer00"]), float(metrics["nmse_layer02"])], per_layer,
                               rtol=1e-4)
    assert float(metrics["tokens"]) == mask.sum()


def test_stage0_trains_only_mixers_and_lowers_the_loss(models, tmp_path):
    t, s = models
    rng = np.random.default_rng(3)
    data = {"tokens": rng.integers(0, TEACHER.vocab_size, (8, 16)).astype(np.int32),
            "loss_mask": np.ones((8, 16), bool)}
    settings = StageSettings(steps=12, batch_size=4, preset=StagePreset(lr=3e-3, warmup_steps=1), progress=False)
    r = align_stage(s, t, data, settings, log_dir=tmp_path / "logs")
    assert r.history[-1]["loss"] < r.history[0]["loss"]
    before, after = s[1], r.params
    for i in range(TEACHER.n_layers):
        for name in ("attn_norm", "mlp_norm", "mlp"):
            for a, b in zip(jax.tree.leaves(before["layers"][i][name]), jax.tree.leaves(after["layers"][i][name])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = [not np.array_equal(np.asarray(before["layers"][0]["mixer"]["in_proj"]["kernel"]),
                                  np.asarray(after["layers"][0]["mixer"]["in_proj"]["kernel"]))]
    assert all(changed)
    np.testing.assert_array_equal(np.asarray(before["layers"][1]["mixer"]["q"]["kernel"]),
                                  np.asarray(after["layers"][1]["mixer"]["q"]["kernel"]))


def test_stage0_bad_inputs(models):
    t, s = models
    settings = StageSettings(steps=1, batch_size=1, preset=StagePreset(lr=1e-3, warmup_steps=0), progress=False)
    data = {"tokens": np.zeros((2, 8), np.int32), "loss_mask": np.ones((2, 8), bool)}
    with pytest.raises(StageError, match="has no Mamba layer"):
        align_stage(t, t, data, settings)
    with pytest.raises(StageError, match="none of the student's Mamba layers"):
        align_stage(s, s, data, settings)


# ------------------------------------------------------------------------------------------------ layer order
def test_layer_nmse_is_the_token_weighted_numpy_loss_of_each_batch(models):
    (t_cfg, t_params), (s_cfg, s_params) = models
    tokens, mask = _rows(5, 3, 10, 6)
    got = layer_nmse((s_cfg, s_params), (t_cfg, t_params), {"tokens": tokens, "loss_mask": mask}, batch_size=2)
    _, first = _stage0_loss_np(t_cfg, t_params, s_cfg, s_params, tokens[:2], mask[:2])
    _, second = _stage0_loss_np(t_cfg, t_params, s_cfg, s_params, tokens[2:], mask[2:])
    w1, w2 = mask[:2].sum(), mask[2:].sum()
    assert sorted(got) == [0, 2]
    np.testing.assert_allclose([got[0], got[2]], (w1 * np.array(first) + w2 * np.array(second)) / (w1 + w2),
                               rtol=1e-4)


def test_layer_kl_is_the_output_kl_of_each_layer_converted_alone(models):
    """Against an independent path: a model with only layer i converted (hybridize, that mixer taken from the
    student), its forward and the token-mean KL to the teacher over both batches' real tokens."""
    import jax.numpy as jnp

    from l2m_jax.train.losses import kl_divergence

    t, s = models
    tokens, mask = _rows(5, 3, 10, 6)
    got = layer_kl(s, t, {"tokens": tokens, "loss_mask": mask}, batch_size=2)
    assert sorted(got) == [0, 2]
    want_logits = l2m_jax.forward(*t, jnp.asarray(tokens))[0]
    for i in (0, 2):
        one = take_mixers(hybridize(*t, [j for j in range(TEACHER.n_layers) if j != i], "mamba2",
                                    jax.random.key(9), init="random"), s, [i])
        logits = l2m_jax.forward(*one, jnp.asarray(tokens))[0]
        want = float(kl_divergence(logits, want_logits, mask=jnp.asarray(mask)))
        assert want > 1e-6 and got[i] == pytest.approx(want, rel=1e-4)
    precompile_layer_scores("kl", s, t, (2, 10))            # the same program, compiled ahead from shapes
    precompile_layer_scores("nmse", s, t, (2, 10))


def test_conversion_order_converts_the_best_reproduced_layers_first():
    assert conversion_order({0: 0.5, 1: 0.1, 2: 0.9, 3: 0.1}, 4) == [1, 3, 0, 2]
    order = conversion_order({i: v for i, v in enumerate([0.3, 0.8, 0.2, 0.6, 0.9, 0.1])}, 6)
    assert order == [5, 2, 0, 3, 1, 4]
    half, quarter = attention_layers_for(6, 0.5, order), attention_layers_for(6, 0.25, order)
    assert half == [1, 3, 4] and set(quarter) <= set(half) and quarter == [1, 4]
    plan = schedule(6, stage1=[0.5, 0.25], sft=[], dpo=False, order=order)
    assert [p.attn_layers for p in plan] == [(1, 3, 4), (1, 4)]
    with pytest.raises(StageError, match="every one of the 4 layers"):
        conversion_order({0: 0.1, 1: 0.2}, 4)
    with pytest.raises(StageError, match="not finite"):
        conversion_order({0: 0.1, 1: float("nan")}, 2)
    with pytest.raises(ValueError, match="every layer of the 4-layer model once"):
        attention_layers_for(4, 0.5, [0, 1, 1, 2])


def test_keep_last_moves_layers_to_the_end_of_the_order():
    order = [5, 2, 0, 3, 1, 4]
    moved = keep_last(order, [2, 0])
    assert moved == [5, 3, 1, 4, 2, 0]
    assert attention_layers_for(6, 1 / 6, moved) == [0] and set(attention_layers_for(6, 0.5, moved)) == {2, 0, 4}
    assert keep_last(order, []) == order and keep_last(moved, [2, 0]) == moved
    with pytest.raises(StageError, match="not in it: \\[7\\]"):
        keep_last(order, [7])
    with pytest.raises(StageError, match="distinct"):
        keep_last(order, [2, 2])


def test_keep_induction_converts_the_strongest_induction_layers_last(models):
    from l2m_jax.eval.recall import induction_scores
    from l2m_jax.recipe import UsageError, check_config
    from l2m_jax.recipe.config import RecipeConfig, Stage1Config
    from l2m_jax.recipe.run import keep_induction

    teacher, _ = models
    n = teacher[0].n_layers
    ranked = list(range(n))[::-1]
    c = RecipeConfig(stage1=Stage1Config(layer_order="aligned", keep_induction=2))
    check_config(c)
    order, record = keep_induction(c, teacher, ranked)
    scores = induction_scores(teacher)
    top = sorted(scores, key=scores.get)[-2:]
    assert order[-2:] == top == record["kept_for_induction"] and sorted(order) == list(range(n))
    assert record["induction"] == {str(i): v for i, v in scores.items()}
    assert keep_induction(RecipeConfig(stage1=Stage1Config(layer_order="aligned")), teacher, ranked) == (ranked, {})
    with pytest.raises(UsageError, match=f"has {n} attention layers"):
        keep_induction(RecipeConfig(stage1=Stage1Config(layer_order="aligned", keep_induction=n + 1)), teacher,
                       ranked)
    with pytest.raises(UsageError, match="layer_order=aligned"):
        check_config(RecipeConfig(stage1=Stage1Config(layer_order="mil", keep_induction=2)))
    with pytest.raises(UsageError, match="must be >= 0"):
        check_config(RecipeConfig(stage1=Stage1Config(layer_order="aligned", keep_induction=-1)))


def test_take_mixers_copies_only_the_named_layers(models):
    t, (s_cfg, s_params) = models
    every = hybridize(*t, [], "mamba2", jax.random.key(7), init="random")
    half = hybridize(*t, [1, 3], "mamba2", jax.random.key(8), init="conv")
    cfg, params = take_mixers(half, every, [0])
    leaves = jax.tree.leaves
    for a, b in zip(leaves(params["layers"][0]["mixer"]), leaves(every[1]["layers"][0]["mixer"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(leaves(params["layers"][2]["mixer"]), leaves(half[1]["layers"][2]["mixer"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cfg == half[0]
    with pytest.raises(StageError, match="layer 1 is attention in the student"):
        take_mixers(half, every, [1])


def test_plans_in_the_aligned_order():
    from l2m_jax.recipe.config import RecipeConfig, SftConfig, Stage1Config
    from l2m_jax.recipe.run import ALIGN_ALL, make_plan

    order = [5, 2, 0, 3, 1, 4]
    c = RecipeConfig(stage1=Stage1Config(attn_fractions=[0.5], stepwise=True, layer_order="aligned"),
                     sft=SftConfig(attn_fractions=[0.5, 0.0]))
    plan = make_plan(c, 6, order)
    assert plan[0].name == ALIGN_ALL and plan[0].kind == "stage0" and plan[0].attn_layers == ()
    assert not any(p.kind == "stage0" for p in plan[1:])          # no stage 0 per round: the mixers come aligned
    steps = [p.attn_layers for p in plan if p.kind == "stage1"]
    assert steps == [(0, 1, 2, 3, 4), (0, 1, 3, 4), (1, 3, 4)]    # one layer per round, in the order given
    assert [p.attn_layers for p in plan if p.kind == "sft"] == [(1, 3, 4), ()]
    mil = make_plan(RecipeConfig(stage1=Stage1Config(attn_fractions=[0.5])), 6)
    assert [p.kind for p in mil][:2] == ["stage0", "stage1"] and mil[1].attn_layers == (1, 3, 5)
