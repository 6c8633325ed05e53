"""hybridize: MiL's attention -> Mamba initialisation (MIL_SPEC §1.6), its init ranges and layer schedules (§1.2)."""
import functools
import math

import jax
import numpy as np
import pytest

import l2m_jax
from l2m_jax.config import ModelConfig
from l2m_jax.convert.hybridize import attention_layers_for, hybridize, stepwise_order


# D=64, 4 layers, H=8, G=4, P=8 -> d_inner 64, d_xb 32 (two 16-wide Mamba-1 chunks); 8 heads give the
# per-head draws (A, dt) a spread to check
TEACHER = ModelConfig.tiny(n_heads=8, n_kv_heads=4, head_dim=8)


@pytest.fixture(scope="module")
def teacher():
    return TEACHER, l2m_jax.init_params(TEACHER, 0)


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, tokens):
    return l2m_jax.forward(cfg, params, tokens)[0]


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _perturbed(params, layer, key):
    """params with layer `layer`'s attention q/k/v/o moved, standing in for a fine-tuned checkpoint."""
    attn = params["layers"][layer]["mixer"]
    keys = jax.random.split(key, 4)
    moved = {n: {"kernel": attn[n]["kernel"] + 0.05 * jax.random.normal(k, attn[n]["kernel"].shape)}
             for n, k in zip("qkvo", keys)}
    layers = dict(params["layers"])
    layers[layer] = dict(layers[layer], mixer=moved)
    return dict(params, layers=layers)


# ------------------------------------------------------------------------------------------------ schedules
MIL_ATTENTION_LAYERS_32 = {
    0.75: [i for i in range(32) if i % 4 != 0],
    0.5: list(range(1, 32, 2)),
    0.25: [3, 7, 11, 15, 19, 23, 27, 31],
    0.125: [7, 15, 23, 31],
    0.0: [],
}


@pytest.mark.parametrize("fraction", sorted(MIL_ATTENTION_LAYERS_32))
def test_attention_layers_match_mil_yamls(fraction):
    assert attention_layers_for(32, fraction) == MIL_ATTENTION_LAYERS_32[fraction]


def test_llama32_3b_half_keeps_odd_layers():
    assert attention_layers_for(28, 0.5) == list(range(1, 28, 2))
    assert attention_layers_for(4, 1.0) == [0, 1, 2, 3]


def test_stepwise_order_matches_mil():
    want = (list(range(0, 32, 2)) + list(range(1, 32, 4)) + [3, 11, 19, 27] + [7, 23] + [15] + [31])
    assert stepwise_order(32) == want
    for n in (1, 3, 28, 30, 33):  # any depth: every layer exactly once
        assert sorted(stepwise_order(n)) == list(range(n))


def test_attention_fraction_out_of_range():
    with pytest.raises(ValueError, match=r"attn_fraction=1.5 must lie in \[0, 1\]"):
        attention_layers_for(32, 1.5)


# ------------------------------------------------------------------------------------------------ mapping
def test_keeping_every_layer_is_the_teacher(teacher):
    cfg, params = teacher
    s_cfg, s_params = hybridize(cfg, params, attn_layers=range(cfg.n_layers), mixer="mamba2")
    assert s_cfg.layer_mixers == cfg.layer_mixers
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 9))
    np.testing.assert_array_equal(np.asarray(_logits(s_cfg, s_params, tokens)),
                                  np.asarray(_logits(cfg, params, tokens)))


def test_nothing_converted_leaves_the_variant_open(teacher):
    cfg, params = teacher
    s_cfg, s_params = hybridize(cfg, params, attn_layers=range(cfg.n_layers), mixer="mamba2")
    m_cfg, _ = hybridize(s_cfg, s_params, attn_layers=[1, 3], mixer="mamba")
    assert m_cfg.pattern == "MAMA" and m_cfg.ssm.d_state == 16 and m_cfg.ssm.dt_rank == 4


def test_mamba2_takes_mils_mapping(teacher):
    cfg, params = teacher
    before = _np(params)
    s_cfg, s_params = hybridize(cfg, params, attn_layers=[1, 3], mixer="mamba2", key=jax.random.key(1))
    assert s_cfg.pattern == "SASA" and s_cfg.attn_layers == (1, 3)
    s = s_cfg.ssm
    assert (s.d_inner, s.d_xb, s.d_state, s.n_heads, s.head_dim) == (64, 32, 8, 8, 8)
    for i in (0, 2):
        attn, mixer = params["layers"][i]["mixer"], s_params["layers"][i]["mixer"]
        w = np.asarray(mixer["in_proj"]["kernel"])
        assert w.shape == (cfg.d_model, 2 * s.d_inner + 2 * s.d_xb + s.n_heads)
        x0 = s.d_inner  # columns z | x | B | C | dt
        np.testing.assert_array_equal(w[:, x0:x0 + s.d_xb], attn["v"]["kernel"])
        np.testing.assert_array_equal(w[:, x0 + s.d_xb:x0 + 2 * s.d_xb], attn["k"]["kernel"])
        np.testing.assert_array_equal(w[:, x0 + 2 * s.d_xb:x0 + 2 * s.d_xb + s.d_inner], attn["q"]["kernel"])
        np.testing.assert_array_equal(mixer["out_proj"]["kernel"], attn["o"]["kernel"])
        # the rest of the block is the teacher's
        for part in ("attn_norm", "mlp_norm", "mlp"):
            _assert_tree_equal(s_params["layers"][i][part], params["layers"][i][part])
    for i in (1, 3):
        _assert_tree_equal(s_params["layers"][i], params["layers"][i])
    for part in ("embed", "final_norm", "lm_head"):
        _assert_tree_equal(s_params[part], params[part])
    _assert_tree_equal(_np(params), before)  # the input is not modified


def test_mamba1_takes_mils_mapping(teacher):
    cfg, params = teacher
    s_cfg, s_params = hybridize(cfg, params, attn_layers=[1, 3], mixer="mamba", key=jax.random.key(1))
    assert s_cfg.pattern == "MAMA"
    s = s_cfg.ssm
    assert (s.d_inner, s.d_xb, s.d_state, s.dt_rank) == (64, 32, 16, math.ceil(cfg.d_model / 16))
    for i in (0, 2):
        attn, mixer = params["layers"][i]["mixer"], s_params["layers"][i]["mixer"]
        for ours, theirs in (("in_proj_x", "v"), ("B_proj", "k"), ("C_proj", "q"), ("out_proj", "o")):
            np.testing.assert_array_equal(mixer[ours]["kernel"], attn[theirs]["kernel"])
        assert mixer["in_proj_z"]["kernel"].shape == (cfg.d_model, s.d_inner)


def test_random_init_ablation_ignores_attention(teacher):
    cfg, params = teacher
    s_cfg, s_params = hybridize(cfg, params, attn_layers=[1, 3], mixer="mamba", init="random")
    mixer = s_params["layers"][0]["mixer"]
    assert not np.array_equal(mixer["in_proj_x"]["kernel"], params["layers"][0]["mixer"]["v"]["kernel"])
    bound = 1 / math.sqrt(cfg.d_model)
    assert np.abs(np.asarray(mixer["in_proj_x"]["kernel"])).max() <= bound


# ------------------------------------------------------------------------------------------------ fresh init
def test_fresh_mamba2_params_have_mils_init(teacher):
    cfg, params = teacher
    s_cfg, s_params = hybridize(cfg, params, attn_layers=[1, 3], mixer="mamba2", key=jax.random.key(7))
    m = _np(s_params["layers"][0]["mixer"])
    s = s_cfg.ssm
    A = np.exp(m["A_log"])
    assert A.shape == (8,) and A.min() >= 1.0 and A.max() <= 16.0 and A.max() - A.min() > 5.0
    dt = np.logaddexp(0.0, m["dt_bias"].astype(np.float64))
    assert dt.min() >= 1e-4 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5) and dt.max() / dt.min() > 5.0
    for name in ("A_log", "D", "dt_bias"):  # inside exp/softplus: kept fp32
        assert m[name].dtype == np.float32
    np.testing.assert_array_equal(m["D"], np.ones(8, np.float32))
    np.testing.assert_array_equal(m["norm"]["scale"], np.ones(s.d_inner, np.float32))
    assert m["conv"]["kernel"].shape == (4, 2 * s.d_xb + s.d_inner)
    for a in (m["conv"]["kernel"], m["conv"]["bias"]):  # torch Conv1d default, fan_in = W = 4
        assert np.abs(a).max() <= 0.5 and np.abs(a).max() > 0.4
    w = m["in_proj"]["kernel"]
    fresh = np.concatenate([w[:, :s.d_inner], w[:, -s.n_heads:]], axis=1)  # z and dt columns
    assert np.abs(fresh).max() <= 1 / math.sqrt(cfg.d_model) and np.abs(fresh).max() > 0.8 / math.sqrt(cfg.d_model)


def test_fresh_mamba1_params_have_mils_init(teacher):
    cfg, params = teacher
    s_cfg, s_params = hybridize(cfg, params, attn_layers=[], mixer="mamba", key=jax.random.key(7))
    m = _np(s_params["layers"][0]["mixer"])
    s = s_cfg.ssm
    np.testing.assert_allclose(np.exp(m["A_log"]), np.tile(np.arange(1, 17, dtype=np.float32), (s.d_inner, 1)),
                               rtol=1e-6, atol=0)
    np.testing.assert_array_equal(m["D"], np.ones(s.d_inner, np.float32))
    # MiL's draw b = softplus^-1(dt), added twice by its layer: the Δ bias here (added once) is 2b
    dt = np.logaddexp(0.0, m["dt_proj"]["bias"].astype(np.float64) / 2)
    assert dt.shape == (s.d_inner,) and dt.min() >= 1e-4 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert np.abs(m["dt_proj"]["kernel"]).max() <= s.dt_rank ** -0.5
    assert np.abs(m["conv"]["kernel"]).max() <= 0.5 and m["conv"]["kernel"].shape == (4, s.d_inner)


# ------------------------------------------------------------------------------------------------ progressive
def test_rehybridize_keeps_mamba_and_converts_finetuned_attention(teacher):
    cfg, params = teacher
    half_cfg, half = hybridize(cfg, params, attention_layers_for(4, 0.5), mixer="mamba2", key=jax.random.key(1))
    assert half_cfg.attn_layers == (1, 3)
    tuned = _perturbed(half, 1, jax.random.key(5))  # "fine-tuned" attention of layer 1
    q_cfg, quarter = hybridize(half_cfg, tuned, attention_layers_for(4, 0.25), mixer="mamba2",
                               key=jax.random.key(2))
    assert q_cfg.pattern == "SSSA" and q_cfg.ssm == half_cfg.ssm
    for i in (0, 2):  # already Mamba: untouched
        _assert_tree_equal(quarter["layers"][i], half["layers"][i])
    _assert_tree_equal(quarter["layers"][3], half["layers"][3])
    s = q_cfg.ssm
    w = np.asarray(quarter["layers"][1]["mixer"]["in_proj"]["kernel"])
    attn = tuned["layers"][1]["mixer"]
    assert not np.array_equal(attn["v"]["kernel"], params["layers"][1]["mixer"]["v"]["kernel"])
    np.testing.assert_array_equal(w[:, s.d_inner:s.d_inner + s.d_xb], attn["v"]["kernel"])
    np.testing.assert_array_equal(w[:, s.d_inner + s.d_xb:s.d_inner + 2 * s.d_xb], attn["k"]["kernel"])
    np.testing.assert_array_equal(w[:, s.d_inner + 2 * s.d_xb:2 * s.d_inner + 2 * s.d_xb], attn["q"]["kernel"])
    np.testing.assert_array_equal(quarter["layers"][1]["mixer"]["out_proj"]["kernel"], attn["o"]["kernel"])


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors(teacher):
    cfg, params = teacher
    with pytest.raises(ValueError, match=r"attn_layers \[4\] out of range for a 4-layer model"):
        hybridize(cfg, params, [1, 4])
    with pytest.raises(ValueError, match=r"attn_layers \[1, 1\] has duplicates"):
        hybridize(cfg, params, [1, 1])
    with pytest.raises(ValueError, match="mixer='mamba3' does not exist"):
        hybridize(cfg, params, [1], mixer="mamba3")
    with pytest.raises(ValueError, match="init='zeros'"):
        hybridize(cfg, params, [1], init="zeros")
    odd = ModelConfig.tiny(n_heads=4, n_kv_heads=2, head_dim=12)  # kv width 24: not whole 16-wide Mamba-1 state chunks
    with pytest.raises(ValueError, match="kv width 24 to be a multiple of its 16-wide state chunks"):
        hybridize(odd, l2m_jax.models.abstract_params(odd), [1], mixer="mamba")
    h_cfg, h_params = hybridize(cfg, params, [1, 3], mixer="mamba2")
    with pytest.raises(ValueError, match=r"layers \[0\] are already Mamba"):
        hybridize(h_cfg, h_params, [0, 1, 3])
    with pytest.raises(ValueError, match="one SSM variant per model"):
        hybridize(h_cfg, h_params, [3], mixer="mamba")
