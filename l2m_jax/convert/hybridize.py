"""Attention -> Mamba initialisation (MiL, MIL_SPEC §1.6) and the layer schedules of MIL_SPEC §1.2.

    python -m l2m_jax.convert.hybridize --teacher smollm2 --attn-fraction 0.5 --mixer mamba2 --out DIR
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ConfigError, ModelConfig, default_ssm_config
from ..models.mamba import MambaMixer
from ..models.mamba2 import Mamba2Mixer

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


def attention_layers_for(n_layers: int, attn_fraction: float) -> list[int]:
    """The attention layers MiL keeps at a given attention fraction.

    0.75 keeps all but i ≡ 0 (mod 4) (MiL's first progressive step); other fractions keep the layers left after
    converting the first round(n·(1−f)) layers of `stepwise_order` (0.5 -> odd layers, 0.25 -> i ≡ 3 mod 4,
    0.125 -> i ≡ 7 mod 8 for 32 layers, 0 -> none).
    """
    if not 0.0 <= attn_fraction <= 1.0:
        raise ValueError(f"attn_fraction={attn_fraction} must lie in [0, 1]")
    if attn_fraction == 0.75:
        return [i for i in range(n_layers) if i % 4]
    n_convert = round(n_layers * (1.0 - attn_fraction))
    converted = set(stepwise_order(n_layers)[:n_convert])
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
    """MiL's mapping into a freshly initialised mixer: x <- V, B <- K, C <- Q, out_proj <- O."""
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
    out["out_proj"] = {"kernel": o.astype(fresh["out_proj"]["kernel"].dtype)}
    return out


def hybridize(cfg: ModelConfig, params, attn_layers, mixer: str = "mamba2", key=None, *, init: str = "attention"):
    """Replace every attention layer not in `attn_layers` by a `mixer` layer; returns (student_cfg, params).

    Embeddings, norms, MLPs and the kept attention layers are shared with `params` (not copied). A converted
    layer's mixer starts from its own (possibly fine-tuned) q/k/v/o when init="attention", or entirely fresh
    when init="random" (the ablation). Layers that are already Mamba are kept as they are, so a hybrid can be
    re-hybridized to a lower attention fraction.
    """
    if init not in ("attention", "random"):
        raise ValueError(f"init={init!r}; choose 'attention' or 'random'")
    keep = _check_layers(cfg, attn_layers, mixer)
    ssm = _ssm_for(cfg, mixer)
    mixers = tuple("attention" if i in keep else (m if m != "attention" else mixer)
                   for i, m in enumerate(cfg.layer_mixers))
    new_cfg = cfg.replace(layer_mixers=mixers, ssm=ssm if any(m != "attention" for m in mixers) else None)
    key = jax.random.key(0) if key is None else key
    layers = dict(params["layers"])
    for i, (old, new) in enumerate(zip(cfg.layer_mixers, mixers)):
        if old == new:
            continue
        module = _MIXER_MODULES[new](new_cfg, nnx.Rngs(params=jax.random.fold_in(key, i)))
        fresh = nnx.to_pure_dict(nnx.state(module, nnx.Param))
        mixer_params = fresh if init == "random" else attention_to_mixer(new, layers[i]["mixer"], fresh, new_cfg)
        layers[i] = dict(layers[i], mixer=mixer_params)
    return new_cfg, dict(params, layers=layers)


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
