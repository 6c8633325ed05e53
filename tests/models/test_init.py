"""The initialisations of hybridize beyond MiL's mapping: identity conv, calibrated output scale, their errors."""
import jax
import numpy as np
import pytest

import l2m_jax
from l2m_jax.config import ModelConfig
from l2m_jax.convert.hybridize import INITS, hybridize, output_rms_ratios
from l2m_jax.ops.conv import causal_conv1d

# D=64, H=8, G=4, P=8: two 16-wide Mamba-1 chunks, so both mixers build
TEACHER = ModelConfig.tiny(n_heads=8, n_kv_heads=4, head_dim=8)
KEEP = [1, 3]
CONVERTED = [0, 2]


@pytest.fixture(scope="module")
def teacher():
    return TEACHER, l2m_jax.init_params(TEACHER, 0)


@pytest.fixture(scope="module")
def calib():
    return np.random.default_rng(0).integers(0, TEACHER.vocab_size, (3, 24)).astype(np.int32)


def _mixer(params, i):
    return params["layers"][i]["mixer"]


@pytest.mark.parametrize("mixer", ["mamba2", "mamba"])
def test_calibrated_output_rms_matches_the_attention_output(teacher, calib, mixer):
    s_cfg, s_params = hybridize(*teacher, KEEP, mixer, jax.random.key(1), init="calibrated", calibration=calib)
    ratios = output_rms_ratios(teacher, (s_cfg, s_params), CONVERTED, calib)
    assert set(ratios) == set(CONVERTED)
    for i, r in ratios.items():
        assert abs(r - 1.0) <= 1e-3, (i, r)
    # before calibration the MiL mapping is far off (the gated norm's unit-RMS output into o_proj)
    m_cfg, m_params = hybridize(*teacher, KEEP, mixer, jax.random.key(1), init="conv")
    before = output_rms_ratios(teacher, (m_cfg, m_params), CONVERTED, calib)
    assert any(abs(r - 1.0) > 0.1 for r in before.values())


def test_calibration_respects_the_mask(teacher, calib):
    mask = np.ones(calib.shape, bool)
    mask[:, 16:] = False                       # right padding: only the first 16 positions count
    s = hybridize(*teacher, KEEP, "mamba2", jax.random.key(1), init="calibrated", calibration=calib,
                  calibration_mask=mask)
    for r in output_rms_ratios(teacher, s, CONVERTED, calib[:, :16]).values():
        assert abs(r - 1.0) <= 1e-3
    # the padded positions do change the unmasked measure
    assert any(abs(r - 1.0) > 1e-3 for r in output_rms_ratios(teacher, s, CONVERTED, calib).values())


def test_identity_conv_passes_its_input_through(teacher):
    s_cfg, s_params = hybridize(*teacher, KEEP, "mamba2", jax.random.key(1), init="conv")
    conv = _mixer(s_params, 0)["conv"]
    x = jax.random.normal(jax.random.key(2), (2, 9, conv["kernel"].shape[1]))
    y, _ = causal_conv1d(x, conv["kernel"], conv["bias"])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    # MiL's conv is a fresh random one
    mil = hybridize(*teacher, KEEP, "mamba2", jax.random.key(1), init="mil")[1]
    assert not np.allclose(np.asarray(_mixer(mil, 0)["conv"]["kernel"][-1]), 1.0)


def test_each_part_changes_only_its_own_parameters(teacher, calib):
    made = {init: hybridize(*teacher, KEEP, "mamba2", jax.random.key(1), init=init,
                            **({"calibration": calib} if init in ("norm", "calibrated") else {}))[1]
            for init in INITS}
    mil, conv, norm, cal = (_mixer(made[k], 0) for k in ("mil", "conv", "norm", "calibrated"))
    same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))
    assert same(conv["norm"]["scale"], mil["norm"]["scale"]) and not same(conv["conv"]["kernel"], mil["conv"]["kernel"])
    assert same(norm["conv"]["kernel"], mil["conv"]["kernel"]) and not same(norm["norm"]["scale"], mil["norm"]["scale"])
    assert same(cal["conv"]["kernel"], conv["conv"]["kernel"])
    for k in ("in_proj", "out_proj"):
        assert same(cal[k]["kernel"], mil[k]["kernel"])
    # the gated-norm weight stays one number per layer: a uniform scale
    scale = np.asarray(cal["norm"]["scale"])
    np.testing.assert_allclose(scale, scale[0])
    assert not same(_mixer(made["random"], 0)["in_proj"]["kernel"], mil["in_proj"]["kernel"])


def test_bad_calibration_inputs_raise_clear_errors(teacher, calib):
    with pytest.raises(ValueError, match="calibration needs token ids"):
        hybridize(*teacher, KEEP, "mamba2", init="calibrated")
    with pytest.raises(ValueError, match="shorter than the conv width 4"):
        hybridize(*teacher, KEEP, "mamba2", init="norm", calibration=calib[:, :3])
    with pytest.raises(ValueError, match="keeps every attention layer"):
        hybridize(*teacher, range(TEACHER.n_layers), "mamba2", init="calibrated", calibration=calib)
    with pytest.raises(ValueError, match="has no Mamba layer"):
        output_rms_ratios(teacher, teacher, [0], calib)
    s = hybridize(*teacher, KEEP, "mamba2", init="mil")
    with pytest.raises(ValueError, match="must be Mamba layers"):
        output_rms_ratios(teacher, s, [1], calib)
    with pytest.raises(ValueError, match="init='zero'"):
        hybridize(*teacher, KEEP, "mamba2", init="zero")


def test_calibrated_rehybridize_leaves_trained_mamba_layers_alone(teacher, calib):
    s_cfg, s_params = hybridize(*teacher, [1, 2, 3], "mamba2", jax.random.key(1), init="calibrated",
                                calibration=calib)
    t_cfg, t_params = hybridize(s_cfg, s_params, [1, 3], "mamba2", jax.random.key(2), init="calibrated",
                                calibration=calib)
    for a, b in zip(jax.tree.leaves(_mixer(s_params, 0)), jax.tree.leaves(_mixer(t_params, 0))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    r = output_rms_ratios((s_cfg, s_params), (t_cfg, t_params), [2], calib)
    assert abs(r[2] - 1.0) <= 1e-3
