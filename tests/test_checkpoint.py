"""Checkpoint formats: l2m (exact), MiL (HF state dict + mamba_config.json, MIL_SPEC §1.1/§1.4/§1.5/§7), HF."""
import functools
import json
import math
import os
import re
import shutil

import jax
import numpy as np
import pytest

import l2m_jax
from l2m_jax.config import ModelConfig
from l2m_jax.convert.hybridize import hybridize
from tests.conftest import rel_err

# D=64, 4 layers, H=8, G=4, P=8 -> d_inner 64, d_xb 32 (two 16-wide Mamba-1 chunks), dt_rank 4
TEACHER = ModelConfig.tiny(n_heads=8, n_kv_heads=4, head_dim=8)
ATTN = [1, 3]
TOKENS = np.random.default_rng(0).integers(0, TEACHER.vocab_size, size=(2, 9))


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, tokens):
    return l2m_jax.forward(cfg, params, tokens)[0]


def _assert_params_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.fixture(scope="module")
def teacher():
    return TEACHER, l2m_jax.init_params(TEACHER, 0)


@pytest.fixture(scope="module")
def hybrids(teacher):
    cfg, params = teacher
    return {m: hybridize(cfg, params, ATTN, mixer=m, key=jax.random.key(3)) for m in ("mamba2", "mamba")}


@pytest.fixture(scope="module")
def mil_dirs(hybrids, tmp_path_factory):
    root = tmp_path_factory.mktemp("mil")
    for m, (cfg, params) in hybrids.items():
        l2m_jax.save(root / m, cfg, params, format="mil")
    return {m: root / m for m in hybrids}


def _read(path):
    from safetensors.numpy import load_file
    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ the spec
def mil_shapes(variant: str, attn_layers, *, n_layers=4, vocab=128, d_model=64, ffn=128, heads=8, kv_heads=4,
               head_dim=8) -> dict[str, tuple]:
    """Every tensor of a MiL hybrid checkpoint and its torch shape, written out from MIL_SPEC §1.4 / §1.5."""
    d_inner, d_xb = heads * head_dim, kv_heads * head_dim
    out = {"model.embed_tokens.weight": (vocab, d_model), "model.norm.weight": (d_model,),
           "lm_head.weight": (vocab, d_model)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out.update({p + "mlp.gate_proj.weight": (ffn, d_model), p + "mlp.up_proj.weight": (ffn, d_model),
                    p + "mlp.down_proj.weight": (d_model, ffn), p + "input_layernorm.weight": (d_model,),
                    p + "post_attention_layernorm.weight": (d_model,)})
        if i in attn_layers:
            a = p + "self_attn."
            out.update({a + "q_proj.weight": (d_inner, d_model), a + "k_proj.weight": (d_xb, d_model),
                        a + "v_proj.weight": (d_xb, d_model), a + "o_proj.weight": (d_model, d_inner)})
        elif variant == "mamba2":
            conv = 2 * d_xb + d_inner
            out.update({p + "mamba.in_proj.weight": (2 * d_inner + 2 * d_xb + heads, d_model),
                        p + "mamba.conv1d.weight": (conv, 1, 4), p + "mamba.conv1d.bias": (conv,),
                        p + "mamba.dt_bias": (heads,), p + "mamba.A_log": (heads,), p + "mamba.D": (heads,),
                        p + "mamba.norm.weight": (d_inner,), p + "mamba.out_proj.weight": (d_model, d_inner)})
        else:
            r = math.ceil(d_model / 16)
            out.update({p + "mamba.in_proj_x.weight": (d_xb, d_model), p + "mamba.in_proj_z.weight": (d_inner, d_model),
                        p + "mamba.B_proj.weight": (d_xb, d_model), p + "mamba.C_proj.weight": (d_inner, d_model),
                        p + "mamba.dt_proj_down.weight": (r, d_model), p + "mamba.dt_proj.weight": (d_inner, r),
                        p + "mamba.dt_proj.bias": (d_inner,), p + "mamba.conv1d.weight": (d_inner, 1, 4),
                        p + "mamba.conv1d.bias": (d_inner,), p + "mamba.A_log": (d_inner, 16),
                        p + "mamba.D": (d_inner,), p + "mamba.out_proj.weight": (d_model, d_inner)})
    return out


def mil_config_json(variant: str, attn_layers) -> dict:
    ssm_cfg = {"expand": 1, "ngroups": 8, "d_state": 8} if variant == "mamba2" else {"expand": 1}
    return {"d_model": 64, "ssm_cfg": ssm_cfg, "rms_norm_eps": 1e-5, "vocab_size": 128, "d_inner": 64, "d_xb": 32,
            "intermediate_size": 128, "hidden_act": "silu", "n_layer": 4, "attn_layers": list(attn_layers)}


# ------------------------------------------------------------------------------------------------ MiL format
@pytest.mark.parametrize("variant", ["mamba2", "mamba"])
def test_mil_round_trip(variant, hybrids, mil_dirs):
    cfg, params = hybrids[variant]
    path = mil_dirs[variant]
    tensors = _read(path)
    assert {k: v.shape for k, v in tensors.items()} == mil_shapes(variant, ATTN)
    assert json.loads((path / "mamba_config.json").read_text()) == mil_config_json(variant, ATTN)
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    # torch layout: Linear (out, in), conv (C, 1, W)
    mixer = params["layers"][0]["mixer"]
    np.testing.assert_array_equal(tensors["model.layers.0.mamba.out_proj.weight"],
                                  np.asarray(mixer["out_proj"]["kernel"]).T)
    np.testing.assert_array_equal(tensors["model.layers.0.mamba.conv1d.weight"][:, 0, :],
                                  np.asarray(mixer["conv"]["kernel"]).T)

    l_cfg, l_params = l2m_jax.load(path)
    assert l_cfg == cfg
    _assert_params_identical(l_params, params)
    np.testing.assert_array_equal(np.asarray(_logits(l_cfg, l_params, TOKENS)),
                                  np.asarray(_logits(cfg, params, TOKENS)))


@pytest.mark.parametrize("variant", ["mamba2", "mamba"])
def test_mil_written_by_hand_loads(variant, tmp_path, torch_cpu):
    """A checkpoint laid out as the original writes it (bf16, names from the spec, not from l2m_jax's table)."""
    torch = torch_cpu
    from safetensors.torch import save_file

    attn = [0, 2]
    shapes = mil_shapes(variant, attn)
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in shapes.items()}
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
              intermediate_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
              tie_word_embeddings=False, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    (tmp_path / "mamba_config.json").write_text(json.dumps(mil_config_json(variant, attn)))
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    cfg, params = l2m_jax.load(tmp_path)
    assert cfg.attn_layers == (0, 2) and set(cfg.layer_mixers) == {"attention", variant}
    assert cfg.param_dtype == "bfloat16" and (cfg.ssm.d_inner, cfg.ssm.d_xb) == (64, 32)

    def t(name):
        return state[name].float().numpy()

    def ours(*path):
        tree = params
        for p in path:
            tree = tree[p]
        return np.asarray(tree, np.float32)

    np.testing.assert_array_equal(ours("embed", "embedding"), t("model.embed_tokens.weight"))
    np.testing.assert_array_equal(ours("lm_head", "kernel"), t("lm_head.weight").T)
    np.testing.assert_array_equal(ours("layers", 0, "mixer", "q", "kernel"),
                                  t("model.layers.0.self_attn.q_proj.weight").T)
    np.testing.assert_array_equal(ours("layers", 1, "mlp", "down", "kernel"),
                                  t("model.layers.1.mlp.down_proj.weight").T)
    np.testing.assert_array_equal(ours("layers", 1, "mlp_norm", "scale"),
                                  t("model.layers.1.post_attention_layernorm.weight"))
    m = ("layers", 3, "mixer")
    p = "model.layers.3.mamba."
    np.testing.assert_array_equal(ours(*m, "conv", "kernel"), t(p + "conv1d.weight")[:, 0, :].T)
    np.testing.assert_array_equal(ours(*m, "conv", "bias"), t(p + "conv1d.bias"))
    np.testing.assert_array_equal(ours(*m, "A_log"), t(p + "A_log"))
    np.testing.assert_array_equal(ours(*m, "D"), t(p + "D"))
    np.testing.assert_array_equal(ours(*m, "out_proj", "kernel"), t(p + "out_proj.weight").T)
    assert params["layers"][3]["mixer"]["A_log"].dtype == np.float32  # upcast: it sits inside exp
    if variant == "mamba2":
        np.testing.assert_array_equal(ours(*m, "in_proj", "kernel"), t(p + "in_proj.weight").T)
        np.testing.assert_array_equal(ours(*m, "dt_bias"), t(p + "dt_bias"))
        np.testing.assert_array_equal(ours(*m, "norm", "scale"), t(p + "norm.weight"))
    else:
        for n in ("in_proj_x", "in_proj_z", "B_proj", "C_proj", "dt_proj_down", "dt_proj"):
            np.testing.assert_array_equal(ours(*m, n, "kernel"), t(p + n + ".weight").T)
        # MiL adds its stored Δ bias b twice (MIL_SPEC §1.5); l2m_jax adds 2b once
        np.testing.assert_array_equal(ours(*m, "dt_proj", "bias"), 2 * t(p + "dt_proj.bias"))

    # writing it back gives the original's names and values (bf16 values survive the fp32 upcast)
    l2m_jax.save(tmp_path / "again", cfg, params, format="mil")
    again = _read(tmp_path / "again")
    assert set(again) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(np.asarray(again[k], np.float32), v.float().numpy())
    assert json.loads((tmp_path / "again" / "mamba_config.json").read_text()) == mil_config_json(variant, attn)


def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    mc = json.loads((dst / "mamba_config.json").read_text())
    (dst / "mamba_config.json").write_text(json.dumps(dict(mc, **changes)))
    return dst


def test_mil_attn_layers_disagreeing_with_tensors(mil_dirs, tmp_path):
    bad = _edited(mil_dirs["mamba2"], tmp_path / "fewer", attn_layers=[1])
    with pytest.raises(l2m_jax.CheckpointError, match="layer 3: mamba_config says Mamba but the tensors say attention"):
        l2m_jax.load(bad)
    bad = _edited(mil_dirs["mamba"], tmp_path / "more", attn_layers=[0, 1, 3])
    with pytest.raises(l2m_jax.CheckpointError, match="layer 0: mamba_config says attention but the tensors say Mamba"):
        l2m_jax.load(bad)
    bad = _edited(mil_dirs["mamba"], tmp_path / "range", attn_layers=[1, 3, 7])
    with pytest.raises(l2m_jax.CheckpointError, match=r"attn_layers \[1, 3, 7\] out of range"):
        l2m_jax.load(bad)


@pytest.mark.parametrize("variant,d_inner", [("mamba2", 96), ("mamba2", 48), ("mamba", 48)])
def test_mil_d_inner_disagreeing_with_tensors(variant, d_inner, mil_dirs, tmp_path):
    # 96 builds a model whose shapes differ; 48 describes no buildable mixer at all (6 heads over 4 kv groups /
    # 48 channels over 32-wide x): both are a broken checkpoint and must say which file
    bad = _edited(mil_dirs[variant], tmp_path / "bad", d_inner=d_inner)
    with pytest.raises(l2m_jax.CheckpointError, match=re.escape(str(bad))):
        l2m_jax.load(bad)


def test_mil_incomplete_checkpoint(mil_dirs, tmp_path):
    from safetensors.numpy import save_file

    bad = tmp_path / "no_embed"
    shutil.copytree(mil_dirs["mamba2"], bad)
    tensors = _read(bad)
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(l2m_jax.CheckpointError, match="missing tensor model.embed_tokens.weight"):
        l2m_jax.load(bad)
    bad = tmp_path / "no_d_inner"
    shutil.copytree(mil_dirs["mamba2"], bad)
    mc = json.loads((bad / "mamba_config.json").read_text())
    del mc["d_inner"]
    (bad / "mamba_config.json").write_text(json.dumps(mc))
    with pytest.raises(l2m_jax.CheckpointError, match="d_inner"):
        l2m_jax.load(bad)


# ------------------------------------------------------------------------------------------------ l2m format
@pytest.mark.parametrize("variant,dtype", [("mamba2", "bfloat16"), ("mamba", "float32")])
def test_l2m_round_trip_is_exact(variant, dtype, hybrids, tmp_path):
    s_cfg, params = hybrids[variant]
    s_cfg = s_cfg.replace(dtype=dtype, param_dtype=dtype)
    # each leaf in the dtype the config gives it (A_log, D, Δ biases stay fp32)
    params = jax.tree.map(lambda a, want: np.asarray(a).astype(want.dtype), params,
                          l2m_jax.models.abstract_params(s_cfg))
    assert params["embed"]["embedding"].dtype == np.dtype(dtype)
    l2m_jax.save(tmp_path / "ck", s_cfg, params, format="l2m")
    l_cfg, l_params = l2m_jax.load(tmp_path / "ck")
    assert l_cfg == s_cfg
    _assert_params_identical(l_params, params)


def test_l2m_params_disagreeing_with_config(hybrids, tmp_path):
    cfg, params = hybrids["mamba2"]
    l2m_jax.save(tmp_path / "ck", cfg, params, format="l2m")
    meta = json.loads((tmp_path / "ck" / "l2m_config.json").read_text())
    meta["config"]["ffn_dim"] = 96
    (tmp_path / "ck" / "l2m_config.json").write_text(json.dumps(meta))
    with pytest.raises(l2m_jax.CheckpointError, match="parameters disagree with l2m_config.json"):
        l2m_jax.load(tmp_path / "ck")


# ------------------------------------------------------------------------------------------------ HF format
def test_hf_teacher_loads_in_transformers(teacher, tmp_path, torch_cpu):
    import transformers as tf

    cfg, params = teacher
    l2m_jax.save(tmp_path / "hf", cfg, params, format="hf")
    model = tf.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch_cpu.no_grad():
        ref = model(torch_cpu.tensor(TOKENS)).logits.numpy()
    assert rel_err(_logits(cfg, params, TOKENS), ref) <= 1e-4
    l_cfg, l_params = l2m_jax.load(tmp_path / "hf")
    assert l_cfg.layer_mixers == cfg.layer_mixers
    _assert_params_identical(l_params, params)


def test_format_misuse(teacher, hybrids, tmp_path):
    with pytest.raises(ValueError, match="format='hf' holds attention-only models"):
        l2m_jax.save(tmp_path / "a", *hybrids["mamba2"], format="hf")
    with pytest.raises(ValueError, match="format='mil' is for hybrids"):
        l2m_jax.save(tmp_path / "b", *teacher, format="mil")
    with pytest.raises(ValueError, match="format='onnx'"):
        l2m_jax.save(tmp_path / "c", *teacher, format="onnx")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


# ------------------------------------------------------------------------------------------------ damaged / missing
def _truncate(fp, keep=0.6):
    data = fp.read_bytes()
    fp.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("fmt,fname", [("l2m", "params.safetensors"), ("mil", "model.safetensors")])
def test_truncated_safetensors_names_the_file(fmt, fname, hybrids, tmp_path):
    cfg, params = hybrids["mamba"]
    l2m_jax.save(tmp_path / "ck", cfg, params, format=fmt)
    _truncate(tmp_path / "ck" / fname)
    with pytest.raises(l2m_jax.CheckpointError) as e:
        l2m_jax.load(tmp_path / "ck")
    msg = str(e.value)
    assert str(tmp_path / "ck" / fname) in msg and "truncated or damaged" in msg
    assert "download it again or re-save" in msg


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_saved_checkpoints_follow_the_umask(umask, dir_mode, file_mode, hybrids, tmp_path):
    cfg, params = hybrids["mamba2"]
    old = os.umask(umask)
    try:
        for fmt in ("l2m", "mil"):
            l2m_jax.save(tmp_path / fmt, cfg, params, format=fmt)
    finally:
        os.umask(old)
    for fmt in ("l2m", "mil"):
        assert (tmp_path / fmt).stat().st_mode & 0o777 == dir_mode
        files = list((tmp_path / fmt).iterdir())
        assert files and all(f.stat().st_mode & 0o777 == file_mode for f in files), fmt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l2m", "mil"]  # no temporary left behind


def test_missing_model_path_is_named(tmp_path):
    from l2m_jax.data.tokenizer import load_tokenizer

    missing = tmp_path / "no_such_model"
    want = f"model path {str(missing)!r} does not exist"
    with pytest.raises(l2m_jax.CheckpointError, match=re.escape(want)):
        l2m_jax.load(missing)
    with pytest.raises(ValueError, match=re.escape(want)) as e:  # not "a tokenizer problem"
        load_tokenizer(missing)
    assert "tokenizer" not in str(e.value)
