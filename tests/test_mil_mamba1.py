"""MiL-format Mamba-1 hybrids reproduce MiL's own layer code, whose Δ bias enters twice (MIL_SPEC §1.5).

A torch-side writer lays a tiny hybrid out as MiL's save does (HF state dict, sharded, + mamba_config.json);
l2m_jax.load must give the logits of a NumPy re-implementation of MiL's model: Llama attention with RoPE for
the kept layers, and MiL's Mamba-1 mixer with Δ = softplus(W·dt_down(u) + 2b) and its 16-wide chunk repeat.
"""
import json
import math

import jax
import numpy as np
import pytest

import l2m_jax
from l2m_jax.config import ModelConfig
from l2m_jax.convert.hybridize import hybridize
from tests.conftest import rel_err

# a GQA teacher: D=128, H=8 heads of P=16 over G=2 kv heads -> d_inner 128, d_xb 32: two 16-wide chunks of
# x and B, each repeated r=4 times; dt_rank ceil(128/16) = 8
V, D, N_LAYERS, H, G, P, FFN, EPS, THETA = 96, 128, 3, 8, 2, 16, 160, 1e-5, 10000.0
D_INNER, D_XB, N, DT_RANK, W = H * P, G * P, 16, math.ceil(D / 16), 4
ATTN = [1]
TOKENS = np.random.default_rng(0).integers(0, V, size=(2, 24))


# ------------------------------------------------------------------------------------------------ torch side
def write_mil_checkpoint(path, torch) -> dict:
    """A MiL Mamba-1 hybrid as MiL's `save_pretrained` + `save_config` leave it; returns the numpy tensors.

    Weights as MiL's modules create them (nn.Linear / nn.Conv1d defaults, Mamba's dt and S4D-real A init);
    the norms and D are moved off 1 and the Δ bias drawn over a trained model's range, dt in [0.01, 1], so
    every parameter (and the doubled bias above all) shows in the logits.
    """
    from safetensors.torch import save_file

    nn = torch.nn
    torch.manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(V, D), "model.norm.weight": 1 + 0.1 * torch.randn(D),
             "lm_head.weight": nn.Linear(D, V, bias=False).weight}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": 1 + 0.1 * torch.randn(D),
                      p + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(D),
                      p + "mlp.gate_proj.weight": nn.Linear(D, FFN, bias=False).weight,
                      p + "mlp.up_proj.weight": nn.Linear(D, FFN, bias=False).weight,
                      p + "mlp.down_proj.weight": nn.Linear(FFN, D, bias=False).weight})
        if i in ATTN:
            for n, (fan_in, out) in dict(q=(D, D_INNER), k=(D, D_XB), v=(D, D_XB), o=(D_INNER, D)).items():
                state[p + f"self_attn.{n}_proj.weight"] = nn.Linear(fan_in, out, bias=False).weight
            continue
        m = p + "mamba."
        dt_proj = nn.Linear(DT_RANK, D_INNER, bias=True)
        nn.init.uniform_(dt_proj.weight, -DT_RANK ** -0.5, DT_RANK ** -0.5)
        dt = torch.exp(torch.rand(D_INNER) * (math.log(1.0) - math.log(0.01)) + math.log(0.01)).clamp(min=1e-4)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))      # softplus^-1(dt)
        conv = nn.Conv1d(D_INNER, D_INNER, W, groups=D_INNER, padding=W - 1, bias=True)
        state.update({m + "in_proj_x.weight": nn.Linear(D, D_XB, bias=False).weight,
                      m + "in_proj_z.weight": nn.Linear(D, D_INNER, bias=False).weight,
                      m + "B_proj.weight": nn.Linear(D, D_XB, bias=False).weight,
                      m + "C_proj.weight": nn.Linear(D, D_INNER, bias=False).weight,
                      m + "dt_proj_down.weight": nn.Linear(D, DT_RANK, bias=False).weight,
                      m + "dt_proj.weight": dt_proj.weight, m + "dt_proj.bias": dt_proj.bias,
                      m + "conv1d.weight": conv.weight, m + "conv1d.bias": conv.bias,
                      m + "A_log": torch.log(torch.arange(1, N + 1, dtype=torch.float32).repeat(D_INNER, 1)),
                      m + "D": 1 + 0.1 * torch.randn(D_INNER),
                      m + "out_proj.weight": nn.Linear(D_INNER, D, bias=False).weight})
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}

    # HF's save_pretrained: config.json of the base model and the state dict in shards with an index
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=V, hidden_size=D,
              intermediate_size=FFN, num_hidden_layers=N_LAYERS, num_attention_heads=H, num_key_value_heads=G,
              head_dim=P, hidden_act="silu", rms_norm_eps=EPS, rope_theta=THETA, rope_scaling=None,
              max_position_embeddings=64, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
              torch_dtype="float32", bos_token_id=1, eos_token_id=2)
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(path / fname), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * 4 for v in state.values())},
             "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    # MiL's save_config: MambaConfig.__dict__ (MIL_SPEC §1.1); Mamba-1 sets ssm_cfg = {expand: 1} only
    mamba_config = dict(d_model=D, ssm_cfg={"expand": 1}, rms_norm_eps=EPS, vocab_size=V, d_inner=D_INNER,
                        d_xb=D_XB, intermediate_size=FFN, hidden_act="silu", n_layer=N_LAYERS, attn_layers=ATTN)
    (path / "mamba_config.json").write_text(json.dumps(mamba_config, indent=4))
    return {k: v.numpy() for k, v in state.items()}


# ------------------------------------------------------------------------------------------------ NumPy MiL
def _rms(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def _silu(x):
    return x / (1 + np.exp(-x))


def _linear(x, w):            # torch layout: w (out, in)
    return x @ w.T


def _attention(u, t, p):
    """Llama attention with RoPE (rotate_half), GQA head h <- kv head h // (H/G). u [B, L, D]."""
    b, l, _ = u.shape
    q = _linear(u, t[p + "q_proj.weight"]).reshape(b, l, H, P)
    k = _linear(u, t[p + "k_proj.weight"]).reshape(b, l, G, P)
    v = _linear(u, t[p + "v_proj.weight"]).reshape(b, l, G, P)
    inv = 1.0 / THETA ** (np.arange(0, P, 2) / P)
    ang = np.arange(l)[:, None] * inv[None]                                          # [L, P/2]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):
        half = np.concatenate([-x[..., P // 2:], x[..., :P // 2]], -1)
        return x * cos[None, :, None] + half * sin[None, :, None]

    q, k = rope(q), rope(k)
    k, v = np.repeat(k, H // G, axis=2), np.repeat(v, H // G, axis=2)
    s = np.einsum("bqhp,bkhp->bhqk", q, k) / math.sqrt(P)
    s = np.where(np.tril(np.ones((l, l), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhp->bqhp", a, v).reshape(b, l, H * P)
    return _linear(o, t[p + "o_proj.weight"])


def _repeat_kv(x, r):         # MiL's repeat_kv on [B, groups, L, N]: group j of the result is group j // r
    b, g, l, n = x.shape
    return np.broadcast_to(x[:, :, None], (b, g, r, l, n)).reshape(b, g * r, l, n)


def mil_mamba1(u, t, p, *, bias_twice=True):
    """MiL's mamba/hybrid_mamba_layer.py::Mamba.forward with mamba_ssm's reference selective scan. u [B, L, D]."""
    b, l, _ = u.shape
    r = D_INNER // D_XB
    bias = t[p + "dt_proj.bias"]
    x = _linear(u, t[p + "in_proj_x.weight"])
    z = _linear(u, t[p + "in_proj_z.weight"])
    Bm = _linear(u, t[p + "B_proj.weight"])
    Cm = _linear(u, t[p + "C_proj.weight"])
    dt = _linear(_linear(u, t[p + "dt_proj_down.weight"]), t[p + "dt_proj.weight"]) + bias   # nn.Linear: +b
    # "b l (g n) -> b g l n", repeat_kv, "b g l n -> b (g n) l"
    x = _repeat_kv(x.reshape(b, l, D_XB // N, N).transpose(0, 2, 1, 3), r)
    x = x.transpose(0, 1, 3, 2).reshape(b, D_INNER, l)
    Bm = _repeat_kv(Bm.reshape(b, l, D_XB // N, N).transpose(0, 2, 1, 3), r).transpose(0, 1, 3, 2)  # [B, Gc, N, L]
    Cm = Cm.reshape(b, l, D_INNER // N, N).transpose(0, 2, 3, 1)                                    # [B, Gc, N, L]
    z, dt = z.transpose(0, 2, 1), dt.transpose(0, 2, 1)                                             # [B, C, L]
    # causal_conv1d_fn(x, weight, bias, activation="silu")
    w = t[p + "conv1d.weight"][:, 0, :]                                                             # [C, W]
    xp = np.concatenate([np.zeros((b, D_INNER, W - 1)), x], axis=-1)
    x = _silu(sum(w[None, :, j, None] * xp[:, :, j:j + l] for j in range(W)) + t[p + "conv1d.bias"][None, :, None])
    # selective_scan_fn(..., delta_bias=dt_proj.bias, delta_softplus=True): b enters again
    delta = np.logaddexp(0.0, dt + (bias[None, :, None] if bias_twice else 0.0))
    A = -np.exp(t[p + "A_log"])                                                                     # [C, N]
    group = np.arange(D_INNER) // (D_INNER // Bm.shape[1])                                          # c // 16
    Bc, Cc = Bm[:, group], Cm[:, group]                                                             # [B, C, N, L]
    h = np.zeros((b, D_INNER, N))
    y = np.zeros((b, D_INNER, l))
    for s in range(l):
        h = np.exp(delta[:, :, s, None] * A) * h + delta[:, :, s, None] * Bc[..., s] * x[:, :, s, None]
        y[:, :, s] = np.sum(h * Cc[..., s], axis=-1)
    y = (y + x * t[p + "D"][None, :, None]) * _silu(z)
    return _linear(y.transpose(0, 2, 1), t[p + "out_proj.weight"])


def mil_logits(t, tokens, *, bias_twice=True):
    t = {k: v.astype(np.float64) for k, v in t.items()}
    x = t["model.embed_tokens.weight"][tokens]
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        u = _rms(x, t[p + "input_layernorm.weight"])
        x = x + (_attention(u, t, p + "self_attn.") if i in ATTN else mil_mamba1(u, t, p + "mamba.",
                                                                                bias_twice=bias_twice))
        m = _rms(x, t[p + "post_attention_layernorm.weight"])
        x = x + _linear(_silu(_linear(m, t[p + "mlp.gate_proj.weight"])) * _linear(m, t[p + "mlp.up_proj.weight"]),
                        t[p + "mlp.down_proj.weight"])
    return _linear(_rms(x, t["model.norm.weight"]), t["lm_head.weight"])


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def mil_checkpoint(tmp_path_factory, torch_cpu):
    path = tmp_path_factory.mktemp("mil_mamba1")
    return path, write_mil_checkpoint(path, torch_cpu)


def _assert_params_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_mil_mamba1_checkpoint_reproduces_mils_layer(mil_checkpoint):
    path, tensors = mil_checkpoint
    cfg, params = l2m_jax.load(path)
    assert cfg.pattern == "MAM" and (cfg.n_heads, cfg.n_kv_heads) == (H, G)
    assert (cfg.ssm.d_inner, cfg.ssm.d_xb, cfg.ssm.d_state, cfg.ssm.dt_rank) == (D_INNER, D_XB, N, DT_RANK)
    # MiL's stored b is l2m_jax's 2b (added once here, twice there)
    b = tensors["model.layers.0.mamba.dt_proj.bias"]
    np.testing.assert_array_equal(np.asarray(params["layers"][0]["mixer"]["dt_proj"]["bias"]), 2 * b)

    ours = np.asarray(jax.jit(lambda p, t: l2m_jax.forward(cfg, p, t)[0])(params, TOKENS))
    want = mil_logits(tensors, TOKENS)
    assert rel_err(ours, want) <= 1e-5
    # the test can tell: adding the bias once (l2m_jax's old reading) is far off MiL's layer
    assert rel_err(mil_logits(tensors, TOKENS, bias_twice=False), want) > 1e-3


def test_mil_mamba1_round_trip_keeps_the_stored_bias(mil_checkpoint, tmp_path):
    from safetensors.numpy import load_file

    path, tensors = mil_checkpoint
    cfg, params = l2m_jax.load(path)
    l2m_jax.save(tmp_path / "again", cfg, params, format="mil")
    a_cfg, a_params = l2m_jax.load(tmp_path / "again")
    assert a_cfg == cfg
    _assert_params_identical(a_params, params)
    saved = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(saved) == set(tensors)
    for k, v in tensors.items():      # every tensor bit for bit, the stored Δ biases b included
        assert saved[k].dtype == v.dtype
        np.testing.assert_array_equal(saved[k], v, err_msg=k)
    mc = json.loads((path / "mamba_config.json").read_text())
    assert json.loads((tmp_path / "again" / "mamba_config.json").read_text()) == mc


@pytest.mark.parametrize("init", ["mil", "conv", "calibrated"])
def test_attention_derived_inits_take_mils_effective_dt_bias(init):
    teacher = ModelConfig.tiny(vocab_size=V, d_model=D, n_layers=N_LAYERS, n_heads=H, n_kv_heads=G, head_dim=P,
                               ffn_dim=FFN)
    params = l2m_jax.init_params(teacher, 0)
    key = jax.random.key(4)
    calibration = TOKENS[:, :8] if init == "calibrated" else None
    _, fresh = hybridize(teacher, params, ATTN, mixer="mamba", key=key, init="random")
    s_cfg, student = hybridize(teacher, params, ATTN, mixer="mamba", key=key, init=init, calibration=calibration)
    for i in s_cfg.ssm_layers:
        drawn = np.asarray(fresh["layers"][i]["mixer"]["dt_proj"]["bias"])
        np.testing.assert_array_equal(np.asarray(student["layers"][i]["mixer"]["dt_proj"]["bias"]), 2 * drawn)
        # the draw is MiL's b = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        dt = np.logaddexp(0.0, drawn.astype(np.float64))
        assert dt.min() >= s_cfg.ssm.dt_init_floor * (1 - 1e-5) and dt.max() <= s_cfg.ssm.dt_max * (1 + 1e-5)


def test_mamba2_dt_bias_is_taken_once():
    teacher = ModelConfig.tiny(n_heads=8, n_kv_heads=4, head_dim=8)
    params = l2m_jax.init_params(teacher, 0)
    key = jax.random.key(4)
    _, fresh = hybridize(teacher, params, [1, 3], mixer="mamba2", key=key, init="random")
    _, student = hybridize(teacher, params, [1, 3], mixer="mamba2", key=key, init="mil")
    for i in (0, 2):
        np.testing.assert_array_equal(np.asarray(student["layers"][i]["mixer"]["dt_bias"]),
                                      np.asarray(fresh["layers"][i]["mixer"]["dt_bias"]))
