"""Attention -> Mamba initialisation (MiL, MIL_SPEC §1.6) and the layer schedules of MIL_SPEC §1.2.

    python -m l2m_jax.convert.hybridize --teacher smollm2 --attn-fraction 0.5 --mixer mamba2 --out DIR
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ConfigError, ModelConfig, default_ssm_config
from ..models.mamba import MambaMixer
from ..models.mamba2 import Mamba2Mixer
from ..models import apply_mixer, mixer_io

_MIXER_MODULES = {"mamba": MambaMixer, "mamba2": Mamba2Mixer}


# ------------------------------------------------------------------------------------------------ schedules
def stepwise_order(n_layers: int) -> list[int]:
    """MiL's one-layer-at-a-time replacement order, generalised to any depth.

    Level k replaces the layers with i mod 2^(k+1) == 2^k - 1: for 32 layers 0,2,…,30, then 1,5,…,29, then
    3,11,19,27, then 7,23, then 15, then 31 — exactly the released stepwise yamls.
    """
    order, k = [], 0
    while len(order) < n_layers:
        order += [i for i in range(n_layers) if i % 2 ** (k + 1) == 2 ** k - 1]
        k += 1
    return order


def attention_layers_for(n_layers: int, attn_fraction: float, order=None) -> list[int]:
    """The attention layers kept at a given attention fraction.

    order None (MiL): 0.75 keeps all but i ≡ 0 (mod 4) (MiL's first progressive step); other fractions keep
    the layers left after converting the first round(n·(1−f)) layers of `stepwise_order` (0.5 -> odd layers,
    0.25 -> i ≡ 3 mod 4, 0.125 -> i ≡ 7 mod 8 for 32 layers, 0 -> none).
    order: a conversion order instead, every layer once (e.g. `train.align.conversion_order`): the first
    round(n·(1−f)) layers of it are converted, so the sets of decreasing fractions are nested.
    """
    if not 0.0 <= attn_fraction <= 1.0:
        raise ValueError(f"attn_fraction={attn_fraction} must lie in [0, 1]")
    if order is not None:
        order = [int(i) for i in order]
        if sorted(order) != list(range(n_layers)):
            raise ValueError(f"a conversion order lists every layer of the {n_layers}-layer model once; got {order}")
    elif attn_fraction == 0.75:
        return [i for i in range(n_layers) if i % 4]
    n_convert = round(n_layers * (1.0 - attn_fraction))
    converted = set((stepwise_order(n_layers) if order is None else order)[:n_convert])
    return [i for i in range(n_layers) if i not in converted]


# ------------------------------------------------------------------------------------------------ hybridize
def _check_layers(cfg: ModelConfig, attn_layers, mixer: str) -> tuple[int, ...]:
    if mixer not in _MIXER_MODULES:
        raise ConfigError(f"mixer={mixer!r} does not exist; choose 'mamba' or 'mamba2'")
    layers = [int(i) for i in attn_layers]
    bad = [i for i in layers if not 0 <= i < cfg.n_layers]
    if bad:
        raise ValueError(f"attn_layers {bad} out of range for a {cfg.n_layers}-layer model")
    if len(set(layers)) != len(layers):
        raise ValueError(f"attn_layers {layers} has duplicates")
    lost = [i for i in layers if cfg.layer_mixers[i] != "attention"]
    if lost:
        raise ValueError(f"layers {lost} are already Mamba: a Mamba layer cannot be turned back into attention")
    other = {m for m in cfg.layer_mixers if m not in ("attention", mixer)}
    if other:
        raise ValueError(f"the model already has {sorted(other)} layers; one SSM variant per model")
    return tuple(sorted(layers))


def _ssm_for(cfg: ModelConfig, mixer: str):
    if cfg.ssm_layers:  # settings of the Mamba layers already there
        return cfg.ssm
    if mixer == "mamba" and (cfg.kv_dim % 16 or cfg.q_dim % cfg.kv_dim):
        raise ConfigError(f"Mamba-1 init needs kv width {cfg.kv_dim} to be a multiple of its 16-wide state chunks "
                          f"and to divide the query width {cfg.q_dim}")
    return default_ssm_config(cfg, mixer)


def attention_to_mixer(mixer: str, attn: dict, fresh: dict, cfg: ModelConfig) -> dict:
    """MiL's mapping into a freshly initialised mixer: x <- V, B <- K, C <- Q, out_proj <- O.

    Mamba-1 also takes MiL's effective Δ bias: MiL draws b = softplus^-1(dt), dt log-uniform in
    [dt_min, dt_max], and its layer adds b twice (MIL_SPEC §1.5), so the converted mixer's Δ bias is 2b for
    the fresh mixer's draw b (l2m_jax adds it once). Mamba2's dt_bias enters once in MiL: kept as drawn.
    """
    q, k, v, o = (attn[n]["kernel"] for n in "qkvo")
    out = jax.tree.map(lambda a: a, fresh)
    if mixer == "mamba2":
        s = cfg.ssm
        w = fresh["in_proj"]["kernel"]                      # [D, z | x | B | C | dt]
        x0 = s.d_inner
        w = w.at[:, x0:x0 + s.d_xb].set(v.astype(w.dtype))
        w = w.at[:, x0 + s.d_xb:x0 + 2 * s.d_xb].set(k.astype(w.dtype))
        w = w.at[:, x0 + 2 * s.d_xb:x0 + 2 * s.d_xb + s.d_inner].set(q.astype(w.dtype))
        out["in_proj"] = {"kernel": w}
    else:
        out["in_proj_x"] = {"kernel": v.astype(fresh["in_proj_x"]["kernel"].dtype)}
        out["B_proj"] = {"kernel": k.astype(fresh["B_proj"]["kernel"].dtype)}
        out["C_proj"] = {"kernel": q.astype(fresh["C_proj"]["kernel"].dtype)}
        out["dt_proj"] = dict(fresh["dt_proj"], bias=2 * fresh["dt_proj"]["bias"])
    out["out_proj"] = {"kernel": o.astype(fresh["out_proj"]["kernel"].dtype)}
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def fresh_mixer(mixer: str, cfg: ModelConfig, key) -> dict:
    """A freshly initialised `mixer` layer's parameters (a pure dict), drawn from `key`. One compiled program
    for every layer of a model, where drawing them op by op compiled and ran each small op per layer."""
    module = _MIXER_MODULES[mixer](cfg, nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


INITS = ("mil", "conv", "norm", "calibrated", "random")
_NEEDS_DATA = ("norm", "calibrated")


def identity_conv(mixer_params: dict) -> dict:
    """The depthwise conv started as the identity (tap W-1 = 1, the rest and the bias 0), so q, k and v reach
    the scan as the attention layer computed them instead of mixed with their three predecessors."""
    w = mixer_params["conv"]["kernel"]                                                  # [W, C]
    kernel = jnp.zeros_like(w).at[-1].set(1)
    return dict(mixer_params, conv={"kernel": kernel, "bias": jnp.zeros_like(mixer_params["conv"]["bias"])})


def _scaled_output(mixer: str, mixer_params: dict, factor) -> dict:
    """The mixer with its output multiplied by `factor`: Mamba2 through its gated-norm weight, Mamba-1 (which
    has no norm) through out_proj. Both are linear in the output, so the output RMS scales by exactly factor."""
    if mixer == "mamba2":
        scale = mixer_params["norm"]["scale"]
        return dict(mixer_params, norm={"scale": (scale * factor).astype(scale.dtype)})
    w = mixer_params["out_proj"]["kernel"]
    return dict(mixer_params, out_proj={"kernel": (w * factor).astype(w.dtype)})


def _check_calibration(cfg: ModelConfig, tokens, mask):
    import numpy as np

    if tokens is None:
        raise ValueError("calibration needs token ids int [B, L] (a few rows of the distillation data); pass "
                         "calibration=..., or use init='mil' / 'conv', which need no data")
    t = np.asarray(tokens)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or not np.issubdtype(t.dtype, np.integer) or t.size == 0:
        raise ValueError(f"calibration tokens must be int [B, L], got {t.dtype} {t.shape}")
    if t.shape[1] < cfg.ssm.d_conv:
        raise ValueError(f"calibration rows of {t.shape[1]} tokens are shorter than the conv width "
                         f"{cfg.ssm.d_conv}; give at least {cfg.ssm.d_conv} (a few hundred is better)")
    if mask is not None and np.asarray(mask).shape != t.shape:
        raise ValueError(f"calibration mask {np.asarray(mask).shape} must match the tokens {t.shape}")
    return t.astype(np.int32)


def _masked_ms(x, mask):          # x [B, L, D] -> mean square over the real positions and channels
    x = x.astype(jnp.float32)
    if mask is None:
        return jnp.mean(x * x)
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(x * x * m) / (jnp.maximum(jnp.sum(m), 1.0) * x.shape[-1])


@functools.partial(jax.jit, static_argnames=("ref_cfg", "cfg", "layers"))
def _output_ms(ref_params, params, tokens, mask, *, ref_cfg, cfg, layers):
    inputs, outputs = mixer_io(ref_cfg, ref_params, tokens, layers, mask=mask)
    return {i: (_masked_ms(outputs[i], mask), _masked_ms(apply_mixer(cfg, params, i, inputs[i], mask=mask), mask))
            for i in layers}


def output_rms_ratios(reference, student, layers, tokens, *, mask=None) -> dict[int, float]:
    """RMS of each layer's mixer output over the RMS of the reference's mixer output it replaces.

    reference, student: (cfg, params); both mixers see the reference's normalised hidden states at that
    layer (tokens int [B, L], mask bool [B, L] marking real tokens, None: all). Ratio 1: same output scale.
    """
    (r_cfg, r_params), (s_cfg, s_params) = reference, student
    layers = tuple(sorted(int(i) for i in layers))
    if not s_cfg.ssm_layers:
        raise ValueError("output_rms_ratios: the student has no Mamba layer; hybridize it first")
    not_ssm = [i for i in layers if s_cfg.layer_mixers[i] == "attention"]
    if not layers or not_ssm:
        raise ValueError(f"layers {list(layers)} must be Mamba layers of the student; attention: {not_ssm}")
    tokens = _check_calibration(s_cfg, tokens, mask)
    ms = _output_ms(r_params, s_params, jnp.asarray(tokens), None if mask is None else jnp.asarray(mask, bool),
                    ref_cfg=r_cfg, cfg=s_cfg, layers=layers)
    return {i: float(jnp.sqrt(m / jnp.maximum(r, 1e-30))) for i, (r, m) in ms.items()}


def precompile_output_rms(reference, student, layers, shape: tuple[int, int], *, mask: bool = False) -> None:
    """Compile what `output_rms_ratios` (and so the calibrated init) runs for models (cfg, params; abstract or
    not) and calibration tokens of `shape` [B, L] (with a mask if `mask`), so that the call after it, in this
    process or from JAX's persistent compilation cache, compiles nothing."""
    (r_cfg, r_params), (s_cfg, s_params) = reference, student
    struct = lambda dtype: jax.ShapeDtypeStruct(tuple(shape), dtype)  # noqa: E731
    _output_ms.lower(r_params, s_params, struct(jnp.int32), struct(jnp.bool_) if mask else None, ref_cfg=r_cfg,
                     cfg=s_cfg, layers=tuple(sorted(int(i) for i in layers))).compile()


def calibrate_output_scale(reference, student, layers, tokens, *, mask=None):
    """Scale each of `layers`' mixer outputs so its RMS equals that of the reference layer's output on the
    calibration tokens (MiL's gated norm hands unit-RMS activations to o_proj, which was trained on the far
    smaller softmax averages of values). Returns (params, {layer: factor applied})."""
    s_cfg, s_params = student
    ratios = output_rms_ratios(reference, student, layers, tokens, mask=mask)
    layer_params = dict(s_params["layers"])
    factors = {}
    for i, r in ratios.items():
        factors[i] = 1.0 / r if r > 0 else 1.0
        layer_params[i] = dict(layer_params[i], mixer=_scaled_output(s_cfg.layer_mixers[i],
                                                                     layer_params[i]["mixer"], factors[i]))
    return dict(s_params, layers=layer_params), factors


def hybridize(cfg: ModelConfig, params, attn_layers, mixer: str = "mamba2", key=None, *, init: str = "mil",
              calibration=None, calibration_mask=None):
    """Replace every attention layer not in `attn_layers` by a `mixer` layer; returns (student_cfg, params).

    Embeddings, norms, MLPs and the kept attention layers are shared with `params` (not copied). Layers that
    are already Mamba are kept as they are, so a hybrid can be re-hybridized to a lower attention fraction.
    A newly converted layer's mixer starts, by `init`:
      "mil"         MiL's mapping from its own (possibly fine-tuned) attention: x <- V, B <- K, C <- Q,
                    out_proj <- O; the rest as a fresh mixer, except that a Mamba-1 Δ bias is doubled to
                    MiL's effective one (`attention_to_mixer`); reproduces the original; needs no data
      "conv"        "mil" with the depthwise conv started as the identity (needs no data)
      "norm"        "mil" with each layer's output scaled to the RMS of the attention output it replaces,
                    measured on `calibration` tokens int [B, L] (`calibrate_output_scale`)
      "calibrated"  both: identity conv, then the output scale calibrated (what the recipe uses)
      "random"      l2m_jax's own fresh mixer, as drawn (the ablation; its Mamba-1 Δ bias is the draw b
                    itself, so Δ starts in [dt_min, dt_max], not at MiL's doubled bias)
    The calibration inputs are this model's own hidden states (`params`), through the converted layers'
    attention; calibration_mask bool [B, L] marks real tokens.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}; choose one of {INITS}")
    keep = _check_layers(cfg, attn_layers, mixer)
    ssm = _ssm_for(cfg, mixer)
    mixers = tuple("attention" if i in keep else (m if m != "attention" else mixer)
                   for i, m in enumerate(cfg.layer_mixers))
    new_cfg = cfg.replace(layer_mixers=mixers, ssm=ssm if any(m != "attention" for m in mixers) else None)
    converted = [i for i, (old, new) in enumerate(zip(cfg.layer_mixers, mixers)) if old != new]
    if init in _NEEDS_DATA:
        if not converted:
            raise ValueError(f"init={init!r} calibrates newly converted Mamba layers, but attn_layers keeps every "
                             f"attention layer of this {cfg.n_layers}-layer model; convert at least one")
        _check_calibration(new_cfg, calibration, calibration_mask)
    key = jax.random.key(0) if key is None else key
    layers = dict(params["layers"])
    for i in converted:
        new = mixers[i]
        fresh = fresh_mixer(new, new_cfg, jax.random.fold_in(key, i))
        if init == "random":
            mixer_params = fresh
        else:
            mixer_params = attention_to_mixer(new, layers[i]["mixer"], fresh, new_cfg)
            if init in ("conv", "calibrated"):
                mixer_params = identity_conv(mixer_params)
        layers[i] = dict(layers[i], mixer=mixer_params)
    student = dict(params, layers=layers)
    if init in _NEEDS_DATA:
        student, _ = calibrate_output_scale((cfg, params), (new_cfg, student), converted, calibration,
                                            mask=calibration_mask)
    return new_cfg, student


# ------------------------------------------------------------------------------------------------ command
def main(argv=None) -> None:
    from ..convert.checkpoint import load, save
    from ..data.tokenizer import load_tokenizer
    from ..eval.perplexity import perplexity
    from ..assets import heldout_text

    ap = argparse.ArgumentParser(prog="python -m l2m_jax.convert.hybridize",
                                 description="Build a MiL hybrid from a teacher and report perplexity before training.")
    ap.add_argument("--teacher", default="smollm2", help="HF dir, .gguf, l2m/MiL dir, or 'smollm2'")
    ap.add_argument("--attn-fraction", type=float, default=0.5)
    ap.add_argument("--mixer", default="mamba2", choices=sorted(_MIXER_MODULES))
    ap.add_argument("--out", default=None, help="write the attention-initialised hybrid here (l2m format)")
    ap.add_argument("--format", default="l2m", choices=["l2m", "mil"])
    ap.add_argument("--text", default=None, help="held-out text file (default: the bundled Jane Austen excerpt)")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    cfg, params = load(a.teacher)
    tok = load_tokenizer(a.teacher)
    text = open(a.text).read() if a.text else heldout_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    keep = attention_layers_for(cfg.n_layers, a.attn_fraction)
    print(f"teacher: {cfg.n_layers} layers; keeping attention at {keep} ({len(keep)}/{cfg.n_layers}), "
          f"mixer={a.mixer}")
    key = jax.random.key(a.seed)
    rows = [("teacher", cfg, params)]
    s_cfg, s_params = hybridize(cfg, params, keep, a.mixer, key)
    rows.append(("attention-initialised hybrid", s_cfg, s_params))
    r_cfg, r_params = hybridize(cfg, params, keep, a.mixer, key, init="random")
    rows.append(("randomly-initialised hybrid", r_cfg, r_params))
    for name, c, p in rows:
        n, ppl = perplexity(c, p, ids, max_tokens=a.max_tokens)
        print(f"{name:32s} pattern {c.pattern}  tokens {n}  ppl {ppl:.3f}")
    if a.out:
        save(a.out, s_cfg, s_params, format=a.format)
        print(f"wrote {a.out} ({a.format})")


if __name__ == "__main__":
    main()
