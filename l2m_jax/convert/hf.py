"""HF / MiL torch-layout state dicts <-> l2m_jax parameter trees, as one table.

Each row: torch name -> (path in the parameter tree, transform). Linear weights are (out, in) in torch and
(in, out) here; depthwise conv weights are (C, 1, W) in torch and [W, C] here. MiL stores Mamba layers under
`model.layers.{i}.mamba.*` and keeps the teacher's names for everything else (MIL_SPEC §7).

MiL's Mamba-1 layer adds its stored `dt_proj.bias` b twice (dt_proj is an nn.Linear with bias, and b is passed
again as the scan's `delta_bias` / the step's `dt_bias`: Δ = softplus(W·dt_down(u) + 2b), MIL_SPEC §1.5);
l2m_jax's Mamba-1 mixer adds its Δ bias once, so the row "twice" maps b -> 2b on load and back on save. Both
are exact in any float dtype (a power-of-two scale). Mamba2's `dt_bias` enters once in MiL too: no rescale.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..errors import CheckpointError
from ..models import abstract_params

# transform name -> (torch -> ours, ours -> torch)
_TRANSFORMS = {
    "id": (lambda a: a, lambda a: a),
    "T": (lambda a: a.T, lambda a: a.T),
    "conv": (lambda a: a[:, 0, :].T, lambda a: a.T[:, None, :]),
    "twice": (lambda a: a * 2, lambda a: a / 2),  # MiL Mamba-1 Δ bias b (added twice) <-> ours 2b (added once)
}

_TRUNK = [("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), "T"),
          ("mlp.up_proj.weight", ("mlp", "up", "kernel"), "T"),
          ("mlp.down_proj.weight", ("mlp", "down", "kernel"), "T"),
          ("input_layernorm.weight", ("attn_norm", "scale"), "id"),
          ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "id")]
_MIXER = {
    "attention": [(f"self_attn.{n}_proj.weight", ("mixer", n, "kernel"), "T") for n in "qkvo"],
    "mamba2": [("mamba.in_proj.weight", ("mixer", "in_proj", "kernel"), "T"),
               ("mamba.conv1d.weight", ("mixer", "conv", "kernel"), "conv"),
               ("mamba.conv1d.bias", ("mixer", "conv", "bias"), "id"),
               ("mamba.dt_bias", ("mixer", "dt_bias"), "id"),
               ("mamba.A_log", ("mixer", "A_log"), "id"),
               ("mamba.D", ("mixer", "D"), "id"),
               ("mamba.norm.weight", ("mixer", "norm", "scale"), "id"),
               ("mamba.out_proj.weight", ("mixer", "out_proj", "kernel"), "T")],
    "mamba": [(f"mamba.{n}.weight", ("mixer", n, "kernel"), "T")
              for n in ("in_proj_x", "in_proj_z", "B_proj", "C_proj", "dt_proj_down")]
             + [("mamba.dt_proj.weight", ("mixer", "dt_proj", "kernel"), "T"),
                ("mamba.dt_proj.bias", ("mixer", "dt_proj", "bias"), "twice"),
                ("mamba.conv1d.weight", ("mixer", "conv", "kernel"), "conv"),
                ("mamba.conv1d.bias", ("mixer", "conv", "bias"), "id"),
                ("mamba.A_log", ("mixer", "A_log"), "id"),
                ("mamba.D", ("mixer", "D"), "id"),
                ("mamba.out_proj.weight", ("mixer", "out_proj", "kernel"), "T")],
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def name_table(cfg: ModelConfig) -> dict[str, tuple[tuple, str]]:
    """torch name -> (parameter path, transform) for every parameter of `cfg`'s model."""
    table = {"model.embed_tokens.weight": (("embed", "embedding"), "id"),
             "model.norm.weight": (("final_norm", "scale"), "id")}
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = (("lm_head", "kernel"), "T")
    for i, mixer in enumerate(cfg.layer_mixers):
        for suffix, path, tf in _TRUNK + _MIXER[mixer]:
            table[f"model.layers.{i}.{suffix}"] = (("layers", i) + path, tf)
    return table


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def params_from_torch_state(cfg: ModelConfig, tensors, *, source: str) -> dict:
    """Build the parameter tree from torch-layout arrays; every problem collected, raised once.

    Arrays take the dtype the config gives each parameter (cfg.param_dtype; A_log, D and Δ biases fp32).
    """
    abstract = abstract_params(cfg)
    params, problems = {}, []
    for name, (path, tf) in name_table(cfg).items():
        if name not in tensors:
            problems.append(f"missing tensor {name}")
            continue
        want = _get(abstract, path)
        a = _TRANSFORMS[tf][0](tensors[name])
        if tuple(a.shape) != tuple(want.shape):
            problems.append(f"{name}: shape {tuple(tensors[name].shape)} does not match the config "
                            f"(expects {tuple(want.shape)} after '{tf}')")
            continue
        _set(params, path, jnp.asarray(a, dtype=want.dtype))
    known = set(name_table(cfg))
    extra = sorted(n for n in tensors if n not in known and not n.endswith(_IGNORED_SUFFIXES)
                   and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[:3]}")
    if problems:
        raise CheckpointError(f"{source}: the weights do not match the config: " + "; ".join(problems[:8])
                              + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
    return params


def torch_state_from_params(cfg: ModelConfig, params) -> dict[str, jax.Array]:
    return {name: _TRANSFORMS[tf][1](jnp.asarray(_get(params, path))) for name, (path, tf) in name_table(cfg).items()}


# ------------------------------------------------------------------------------------------------ files
def read_safetensors_dir(path: str) -> dict[str, jax.Array]:
    """All tensors of an HF directory: model.safetensors or a sharded index."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
    elif os.path.exists(single):
        files = ["model.safetensors"]
    else:
        bins = [f for f in os.listdir(path) if f.endswith(".bin")]
        hint = " (found PyTorch .bin files: re-save with safe_serialization=True)" if bins else ""
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    out = {}
    for fname in files:
        fp = os.path.join(path, fname)
        if not os.path.exists(fp):
            raise CheckpointError(f"{path}: the index names {fname}, which is missing")
        out.update(read_safetensors_file(fp))
    return out


def read_json(fp: str) -> dict:
    """A checkpoint's JSON file; a damaged one is a CheckpointError naming it."""
    try:
        with open(fp) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{fp}: not valid JSON ({e}); the file is truncated or damaged: download it "
                              "again or re-save the checkpoint") from e


def read_safetensors_file(fp: str) -> dict[str, jax.Array]:
    """Every tensor of one .safetensors file; a damaged file is a CheckpointError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(fp, framework="flax") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{fp}: cannot be read as safetensors ({e}); the file is truncated or damaged, "
                              "e.g. by an interrupted download or save: download it again or re-save the "
                              "checkpoint") from e


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """save_file with the mode the user's umask gives new files (safetensors itself leaves them 0600)."""
    from safetensors.flax import save_file

    with open(path, "wb"):
        pass
    mode = os.stat(path).st_mode & 0o777
    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, path, metadata=metadata)
    os.chmod(path, mode)


def load_hf_dir(path: str, *, dtype=None):
    """(cfg, params) from an HF Llama/Mistral directory (config.json + safetensors)."""
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json; expected an HF model directory "
                              "(config.json + model.safetensors), a .gguf file or an l2m_jax checkpoint")
    cfg = ModelConfig.from_hf(path)
    tensors = read_safetensors_dir(path)
    if dtype is None:  # keep the checkpoint's precision
        dtype = str(tensors["model.embed_tokens.weight"].dtype) if "model.embed_tokens.weight" in tensors else None
    if dtype is not None:
        cfg = cfg.replace(param_dtype=str(jnp.dtype(dtype)), dtype=str(jnp.dtype(dtype)))
    return cfg, params_from_torch_state(cfg, tensors, source=path)


def save_hf_dir(path: str, cfg: ModelConfig, params) -> None:
    """An HF directory transformers can load (all-attention models only)."""
    if cfg.ssm_layers:
        raise ValueError("format='hf' holds attention-only models; save a hybrid with format='mil' or 'l2m'")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    write_safetensors(os.path.join(path, "model.safetensors"), torch_state_from_params(cfg, params),
                      metadata={"format": "pt"})
