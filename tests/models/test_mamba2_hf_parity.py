"""The Mamba2 mixer against transformers' Mamba2Mixer (torch slow path, fp32) with the same weights.

MiL's layer and HF's coincide when kv heads = heads (d_xb = d_inner), n_groups = heads and head_dim = state
size: HF's in_proj columns [z, xBC, dt] with xBC = [x, B, C] are then MiL's z|x|B|C|dt, its conv runs over the
same 2·d_xb + d_inner channels and its gated norm groups are one head wide.
"""
import jax.numpy as jnp
import numpy as np

import l2m_jax
from l2m_jax.config import ModelConfig, SSMConfig
from l2m_jax.models.layers import Context
from l2m_jax.ops.rope import rope_inv_freq
from tests.conftest import rel_err

D_MODEL, HEADS, HEAD_DIM, CHUNK = 32, 4, 8, 8


def _hf_mixer(torch):
    import transformers as tf
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    config = tf.Mamba2Config(hidden_size=D_MODEL, num_heads=HEADS, head_dim=HEAD_DIM, state_size=HEAD_DIM,
                             n_groups=HEADS, expand=1, conv_kernel=4, use_bias=False, use_conv_bias=True,
                             layer_norm_epsilon=1e-5, time_step_limit=(0.0, float("inf")), chunk_size=CHUNK,
                             num_hidden_layers=1, vocab_size=16)
    torch.manual_seed(3)
    mixer = Mamba2Mixer(config, layer_idx=0).eval()
    with torch.no_grad():  # move every "identity" init (D=1, norm=1, A=1..H) so the mapping is really tested
        mixer.A_log.copy_(torch.log(torch.empty(HEADS).uniform_(1.0, 16.0)))
        mixer.D.copy_(torch.randn(HEADS))
        mixer.norm.weight.add_(0.3 * torch.randn(D_MODEL))
        mixer.dt_bias.add_(torch.randn(HEADS))
    return mixer


def _l2m_mixer(mixer):
    s = SSMConfig(d_inner=HEADS * HEAD_DIM, d_xb=HEADS * HEAD_DIM, d_state=HEAD_DIM, n_heads=HEADS,
                  head_dim=HEAD_DIM, chunk_size=CHUNK)
    cfg = ModelConfig(vocab_size=16, d_model=D_MODEL, n_layers=1, n_heads=HEADS, n_kv_heads=HEADS,
                      head_dim=HEAD_DIM, ffn_dim=64, layer_mixers=("mamba2",), ssm=s)
    params = l2m_jax.init_params(cfg, 0)
    t = {k: v.detach().numpy() for k, v in mixer.state_dict().items()}
    # written out by hand (not through the checkpoint table): torch Linear (out, in) -> kernel (in, out)
    params["layers"][0]["mixer"] = {
        "in_proj": {"kernel": jnp.asarray(t["in_proj.weight"].T)},
        "conv": {"kernel": jnp.asarray(t["conv1d.weight"][:, 0, :].T), "bias": jnp.asarray(t["conv1d.bias"])},
        "dt_bias": jnp.asarray(t["dt_bias"]), "A_log": jnp.asarray(t["A_log"]), "D": jnp.asarray(t["D"]),
        "norm": {"scale": jnp.asarray(t["norm.weight"])},
        "out_proj": {"kernel": jnp.asarray(t["out_proj.weight"].T)},
    }
    return cfg, params


def test_hf_layout_is_mils_layout(torch_cpu):
    """What this parity rests on: HF's in_proj is MiL's 2·d_inner + 2·d_xb + H wide, its conv 2·d_xb + d_inner."""
    mixer = _hf_mixer(torch_cpu)
    d_inner = d_xb = HEADS * HEAD_DIM
    assert tuple(mixer.in_proj.weight.shape) == (2 * d_inner + 2 * d_xb + HEADS, D_MODEL)
    assert tuple(mixer.conv1d.weight.shape) == (2 * d_xb + d_inner, 1, 4)
    assert mixer.norm.group_size == HEAD_DIM


def test_mixer_matches_transformers_slow_path(torch_cpu):
    torch = torch_cpu
    mixer = _hf_mixer(torch)
    cfg, params = _l2m_mixer(mixer)
    b, l = 2, 21  # 21 = two full chunks and a ragged one
    u = np.random.default_rng(0).standard_normal((b, l, D_MODEL)).astype(np.float32)
    with torch.no_grad():
        ref = mixer.forward(torch.tensor(u)).numpy()  # torch_forward path: no cache, eval, no CUDA kernels

    positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    ctx = Context(positions, jnp.ones((b, l), bool), None, jnp.asarray(rope_inv_freq(HEAD_DIM, 1e4, None)), False)
    out, cache = l2m_jax.models.bind(cfg, params).layers[0].mixer(jnp.asarray(u), ctx, None)
    assert cache is None and out.shape == (b, l, D_MODEL) and out.dtype == jnp.float32
    assert rel_err(out, ref) <= 1e-4
