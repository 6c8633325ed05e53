"""The teacher against code nobody here wrote: transformers' Llama/Mistral (torch, fp32), loaded via l2m_jax.load."""
import numpy as np
import pytest

import l2m_jax
from tests.conftest import rel_err

CASES = {
    "llama-gqa-untied": dict(arch="llama", heads=4, kv=2, tied=False),
    "llama-mha-tied": dict(arch="llama", heads=4, kv=4, tied=True),
    "llama3-rope-scaling": dict(arch="llama", heads=4, kv=2, tied=False,
                                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=32)),
    "mistral-sliding-window": dict(arch="mistral", heads=4, kv=1, tied=False, sliding_window=5),
}


def _hf_model(torch, case):
    import transformers as tf
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
              num_attention_heads=case["heads"], num_key_value_heads=case["kv"], max_position_embeddings=128,
              rms_norm_eps=1e-5, tie_word_embeddings=case["tied"], rope_theta=5000.0)
    if case["arch"] == "llama":
        if "rope_scaling" in case:
            kw["rope_scaling"] = dict(case["rope_scaling"], rope_theta=5000.0)
        config, cls = tf.LlamaConfig(**kw), tf.LlamaForCausalLM
    else:
        config, cls = tf.MistralConfig(sliding_window=case["sliding_window"], **kw), tf.MistralForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(1)
    model = cls(config).eval()
    with torch.no_grad():  # RMSNorm weights start at one: perturb so the loader's mapping is really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, tmp_path, torch_cpu):
    torch = torch_cpu
    model = _hf_model(torch, CASES[name])
    model.save_pretrained(tmp_path)
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 11))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    cfg, params = l2m_jax.load(tmp_path)
    assert cfg.tie_embeddings == CASES[name]["tied"] and ("lm_head" in params) != cfg.tie_embeddings
    logits, _ = l2m_jax.forward(cfg, params, tokens)
    assert logits.dtype == np.float32 and logits.shape == (2, 11, 97)
    assert rel_err(logits, ref) <= 1e-4


def test_sharded_checkpoint_loads(tmp_path, torch_cpu):
    model = _hf_model(torch_cpu, CASES["llama-gqa-untied"])
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    tokens = np.arange(8)[None] % 97
    with torch_cpu.no_grad():
        ref = model(torch_cpu.tensor(tokens)).logits.numpy()
    cfg, params = l2m_jax.load(tmp_path)
    assert rel_err(l2m_jax.forward(cfg, params, tokens)[0], ref) <= 1e-4


def test_bad_inputs(tmp_path, torch_cpu):
    with pytest.raises(l2m_jax.CheckpointError, match="no such file"):
        l2m_jax.load(tmp_path / "nope")
    with pytest.raises(l2m_jax.CheckpointError, match="no config.json"):
        l2m_jax.load(tmp_path)
    model = _hf_model(torch_cpu, CASES["llama-gqa-untied"])
    model.save_pretrained(tmp_path / "m")
    import json
    cfg_path = tmp_path / "m" / "config.json"
    hf = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(hf, model_type="gpt2")))
    with pytest.raises(l2m_jax.config.ConfigError, match="model_type='gpt2' is not supported"):
        l2m_jax.load(tmp_path / "m")
    cfg_path.write_text(json.dumps(dict(hf, intermediate_size=100)))
    with pytest.raises(l2m_jax.CheckpointError, match="do not match the config"):
        l2m_jax.load(tmp_path / "m")
    cfg_path.write_text(json.dumps(hf))
    cfg, params = l2m_jax.load(tmp_path / "m")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        l2m_jax.forward(cfg, params, np.array([[1, 97]]))
