"""Checkpoint formats: l2m_jax's own, MiL's (HF state dict + mamba_config.json), plain HF; and `load`/`save`."""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil

import jax
import jax.numpy as jnp

from ..config import ModelConfig, SSMConfig
from ..errors import CheckpointError, missing_model
from ..models import abstract_params
from .hf import (load_hf_dir, params_from_torch_state, read_json, read_safetensors_dir, read_safetensors_file,
                 save_hf_dir, torch_state_from_params, write_safetensors)

L2M_CONFIG = "l2m_config.json"
L2M_PARAMS = "params.safetensors"
MIL_CONFIG = "mamba_config.json"


def _key(path) -> str:
    """A tree path as a flat tensor name: ("layers", 0, "mixer") -> "layers.0.mixer"."""
    return ".".join(str(getattr(k, "key", k)) for k in path)


def _flat(params) -> dict[str, jax.Array]:
    return {_key(path): v for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


# ------------------------------------------------------------------------------------------------ l2m
def save_l2m(path: str, cfg: ModelConfig, params) -> None:
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, L2M_PARAMS), _flat(params))
    with open(os.path.join(path, L2M_CONFIG), "w") as f:
        json.dump({"format": "l2m", "version": 1, "config": cfg.to_dict()}, f, indent=2)


def load_l2m(path: str):
    meta = read_json(os.path.join(path, L2M_CONFIG))
    cfg = ModelConfig.from_dict(meta["config"])
    tensors = read_safetensors_dir_l2m(path)
    abstract = abstract_params(cfg)
    flat_abs = _flat(abstract)
    problems = [f"missing {k}" for k in flat_abs if k not in tensors]
    problems += [f"{k}: shape {tuple(tensors[k].shape)} != {v.shape}" for k, v in flat_abs.items()
                 if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    problems += [f"unexpected {k}" for k in tensors if k not in flat_abs]
    if problems:
        raise CheckpointError(f"{path}: parameters disagree with {L2M_CONFIG}: " + "; ".join(problems[:8]))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    values = [jnp.asarray(tensors[_key(p)], v.dtype) for p, v in leaves]
    return cfg, jax.tree_util.tree_unflatten(treedef, values)


def read_safetensors_dir_l2m(path: str) -> dict[str, jax.Array]:
    fp = os.path.join(path, L2M_PARAMS)
    if not os.path.exists(fp):
        raise CheckpointError(f"{path}: has {L2M_CONFIG} but no {L2M_PARAMS}; the save was interrupted or the "
                              "file was removed: save the checkpoint again")
    return read_safetensors_file(fp)


# ------------------------------------------------------------------------------------------------ MiL
def mil_config(cfg: ModelConfig) -> dict:
    """`mamba_config.json` as MiL writes it (MIL_SPEC §1.1)."""
    s = cfg.ssm
    variant = next(m for m in cfg.layer_mixers if m != "attention")
    ssm_cfg = {"expand": 1}
    if variant == "mamba2":
        ssm_cfg.update(ngroups=s.n_heads, d_state=s.d_state)
    return dict(d_model=cfg.d_model, ssm_cfg=ssm_cfg, rms_norm_eps=cfg.rms_eps, vocab_size=cfg.vocab_size,
                d_inner=s.d_inner, d_xb=s.d_xb, intermediate_size=cfg.ffn_dim, hidden_act="silu",
                n_layer=cfg.n_layers, attn_layers=list(cfg.attn_layers))


def save_mil(path: str, cfg: ModelConfig, params) -> None:
    if not cfg.ssm_layers:
        raise ValueError("format='mil' is for hybrids; this model has no Mamba layers (use format='hf')")
    os.makedirs(path, exist_ok=True)
    trunk = cfg.replace(layer_mixers=(), ssm=None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(trunk.to_hf(), f, indent=2)
    with open(os.path.join(path, MIL_CONFIG), "w") as f:
        json.dump(mil_config(cfg), f, indent=2)
    write_safetensors(os.path.join(path, "model.safetensors"), torch_state_from_params(cfg, params),
                      metadata={"format": "pt"})


def load_mil(path: str, *, dtype=None):
    """A MiL hybrid checkpoint; the Mamba variant is read off the tensor names."""
    mc = read_json(os.path.join(path, MIL_CONFIG))
    base = ModelConfig.from_hf(path)
    tensors = read_safetensors_dir(path)
    n = int(mc.get("n_layer", base.n_layers))
    attn = sorted(int(i) for i in mc.get("attn_layers", []))
    problems = []
    if n != base.n_layers:
        problems.append(f"n_layer={n} but config.json has {base.n_layers} layers")
    if any(i < 0 or i >= n for i in attn):
        problems.append(f"attn_layers {attn} out of range for {n} layers")
    v2 = any(k.endswith(".mamba.in_proj.weight") for k in tensors)
    v1 = any(k.endswith(".mamba.in_proj_x.weight") for k in tensors)
    if v1 == v2:
        problems.append("cannot tell the Mamba variant: expected `mamba.in_proj.weight` (Mamba2) or "
                        "`mamba.in_proj_x.weight` (Mamba-1) tensors, exactly one kind")
    for i in range(n):
        has_attn = f"model.layers.{i}.self_attn.q_proj.weight" in tensors
        if has_attn != (i in attn):
            problems.append(f"layer {i}: mamba_config says {'attention' if i in attn else 'Mamba'} but the "
                            f"tensors say {'attention' if has_attn else 'Mamba'}")
    if problems:
        raise CheckpointError(f"{path}: {MIL_CONFIG} disagrees with the checkpoint: " + "; ".join(problems[:6]))
    variant = "mamba2" if v2 else "mamba"
    sc = mc.get("ssm_cfg", {})
    lacking = [k for k in ("d_inner", "d_xb") if k not in mc]
    if lacking:
        raise CheckpointError(f"{path}: {MIL_CONFIG} lacks {lacking}")
    d_inner, d_xb = int(mc["d_inner"]), int(mc["d_xb"])
    if variant == "mamba2":
        d_state = int(sc.get("d_state", base.head_dim))
        ssm = SSMConfig(d_inner=d_inner, d_xb=d_xb, d_state=d_state, n_heads=d_inner // d_state, head_dim=d_state,
                        d_conv=int(sc.get("d_conv", 4)))
    else:
        dt_rank = sc.get("dt_rank", "auto")
        ssm = SSMConfig(d_inner=d_inner, d_xb=d_xb, d_state=int(sc.get("d_state", 16)), n_heads=base.n_heads,
                        head_dim=base.head_dim, d_conv=int(sc.get("d_conv", 4)),
                        dt_rank=math.ceil(base.d_model / 16) if dt_rank == "auto" else int(dt_rank))
    mixers = tuple("attention" if i in attn else variant for i in range(n))
    if dtype is None and "model.embed_tokens.weight" in tensors:
        dtype = str(tensors["model.embed_tokens.weight"].dtype)
    cfg = base.replace(layer_mixers=mixers, ssm=ssm)
    if dtype is not None:
        cfg = cfg.replace(dtype=str(jnp.dtype(dtype)), param_dtype=str(jnp.dtype(dtype)))
    try:
        abstract_params(cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: {MIL_CONFIG} describes no buildable {variant} layer: {e}") from None
    return cfg, params_from_torch_state(cfg, tensors, source=path)


# ------------------------------------------------------------------------------------------------ dispatch
def load(path, *, dtype=None):
    """(cfg, params) from an HF Llama/Mistral dir, a .gguf file, an l2m or MiL dir, or the name "smollm2"."""
    path = os.fspath(path)
    if path == "smollm2":
        from ..assets import smollm2_hf_dir
        path = os.fspath(smollm2_hf_dir())
    if not os.path.exists(path):
        raise CheckpointError(missing_model(path))
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            from .gguf import read_gguf
            hf, tensors = read_gguf(path)
            cfg = ModelConfig.from_hf(hf)
            if dtype is not None:
                cfg = cfg.replace(dtype=str(jnp.dtype(dtype)), param_dtype=str(jnp.dtype(dtype)))
            return cfg, params_from_torch_state(cfg, tensors, source=path)
        raise CheckpointError(f"{path}: a file that is not .gguf; pass a directory or a .gguf file")
    if os.path.exists(os.path.join(path, L2M_CONFIG)):
        if dtype is not None:
            raise ValueError(f"{path}: an l2m checkpoint loads in the dtypes it was saved with; cast the params "
                             "afterwards (jax.tree.map) instead of passing dtype=")
        return load_l2m(path)
    if os.path.exists(os.path.join(path, MIL_CONFIG)):
        return load_mil(path, dtype=dtype)
    return load_hf_dir(path, dtype=dtype)


_SAVERS = {"l2m": save_l2m, "mil": save_mil, "hf": save_hf_dir}


def _sibling_dir(path: str) -> str:
    """A new empty directory next to `path`, made with the user's umask (mkdtemp would make it 0700, and
    the renamed checkpoint with it)."""
    parent, base = os.path.split(path)
    while True:
        tmp = os.path.join(parent, f".tmp-{base}-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue


def save(path, cfg: ModelConfig, params, format: str = "l2m") -> None:
    """Write atomically: into a temporary sibling directory, then rename over `path`.

    The directory and its files get the permissions the user's umask gives new files (0755 / 0644 under 022).
    """
    if format not in _SAVERS:
        raise ValueError(f"format={format!r}; choose one of {sorted(_SAVERS)}")
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _sibling_dir(path)
    try:
        _SAVERS[format](tmp, cfg, params)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
