"""Read a llama.cpp GGUF checkpoint of a Llama-architecture model into HF form.

`read_gguf(path)` returns what an HF Llama directory would hold: a `config.json`-style dict and float32
tensors under HF names in torch `(out, in)` layout. Quantised tensors are dequantised with the `gguf`
package (llama.cpp's own Python reader), so the result is the model llama.cpp runs, not the original
release. `l2m_jax.load` goes from there through the same path as an HF directory.

Two things differ between a GGUF and HF's Llama layout:
  * names (`blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`), a table below;
  * llama.cpp's converter interleaves the two rotary halves of every q/k head (GGUF row 2j+h is HF row
    h*P/2+j): `_unpermute_rope` undoes it so HF's rotate-half RoPE applies.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from ..errors import CheckpointError

__all__ = ["CheckpointError", "open_gguf", "gguf_field", "read_gguf"]

_MAGIC = b"GGUF"
_REQUIRED = object()


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` over `path`, with one clear error for a missing, foreign or broken file."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file {path!r} does not exist; pass the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise CheckpointError(f"{path!r} is not a GGUF file (it starts with {magic!r}, not {_MAGIC!r}); "
                              "pass a llama.cpp .gguf checkpoint")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises assorted errors on truncated or corrupt files
        raise CheckpointError(f"{path!r} could not be parsed as GGUF ({type(e).__name__}: {e}); "
                              "the file may be truncated or corrupt") from e


def gguf_field(reader, key: str, default: Any = _REQUIRED) -> Any:
    """The value of metadata `key`: a Python scalar, str, or list for arrays."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            name = getattr(reader.data, "filename", "the GGUF file")
            raise CheckpointError(f"{name!r}: GGUF metadata key {key!r} is missing")
        return default
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _arch_field(reader, arch: str, key: str, default: Any = _REQUIRED) -> Any:
    return gguf_field(reader, f"{arch}.{key}", default)


def _hf_config(reader, path: str) -> dict[str, Any]:
    """The HF `config.json` dict that the GGUF metadata describes."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path!r} holds a {arch!r} model (general.architecture); l2m_jax reads GGUF "
                              "files of the 'llama' architecture only (Llama, Mistral, SmolLM...)")
    d_model = int(_arch_field(reader, arch, "embedding_length"))
    n_heads = int(_arch_field(reader, arch, "attention.head_count"))
    n_kv = int(_arch_field(reader, arch, "attention.head_count_kv", n_heads))
    head_dim = int(_arch_field(reader, arch, "attention.key_length", d_model // n_heads))
    value_dim = int(_arch_field(reader, arch, "attention.value_length", head_dim))
    rope_dim = int(_arch_field(reader, arch, "rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise CheckpointError(f"{path!r}: key/value/rotary head sizes {head_dim}/{value_dim}/{rope_dim} differ; "
                              "l2m_jax supports full-rotary heads with equal key and value sizes")
    vocab = _arch_field(reader, arch, "vocab_size", None)
    if vocab is None:  # older files: the embedding's rows are the model's vocabulary
        embed = [t for t in reader.tensors if t.name == "token_embd.weight"]
        vocab = int(embed[0].shape[-1]) if embed else len(gguf_field(reader, "tokenizer.ggml.tokens", []))
    cfg: dict[str, Any] = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
        hidden_size=d_model, num_hidden_layers=int(_arch_field(reader, arch, "block_count")),
        num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
        intermediate_size=int(_arch_field(reader, arch, "feed_forward_length")),
        rms_norm_eps=_f32(_arch_field(reader, arch, "attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(_arch_field(reader, arch, "rope.freq_base", 10000.0)),
        max_position_embeddings=int(_arch_field(reader, arch, "context_length")),
        vocab_size=int(vocab), attention_bias=False, mlp_bias=False,
        tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
        torch_dtype="float32",
    )
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        token_id = gguf_field(reader, f"tokenizer.ggml.{gguf_key}", None)
        if token_id is not None:
            cfg[hf_key] = int(token_id)
    scaling = _arch_field(reader, arch, "rope.scaling.type", "none")
    if scaling != "none":
        cfg["rope_scaling"] = {"rope_type": scaling,
                               "factor": _f32(_arch_field(reader, arch, "rope.scaling.factor", 1.0))}
        orig = _arch_field(reader, arch, "rope.scaling.original_context_length", None)
        if orig is not None:
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    return cfg


def _f32(value) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.99999974738e-06; keep the short decimal it was written from
    return float(str(np.float32(value)))


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:  # [H*P, D] -> [H*P, D]
    """Undo llama.cpp's per-head interleave of the rotary halves (GGUF row 2j+h -> HF row h*P/2+j)."""
    rows, cols = w.shape
    p = rows // n_heads
    return w.reshape(n_heads, p // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


# GGUF per-block suffix -> (HF name under model.layers.{i}., expected (out, in) shape from the config)
_Shape = Callable[[dict], tuple]
_BLOCK_TABLE: dict[str, tuple[str, _Shape]] = {
    "attn_norm.weight": ("input_layernorm.weight", lambda c: (c["hidden_size"],)),
    "attn_q.weight": ("self_attn.q_proj.weight",
                      lambda c: (c["num_attention_heads"] * c["head_dim"], c["hidden_size"])),
    "attn_k.weight": ("self_attn.k_proj.weight",
                      lambda c: (c["num_key_value_heads"] * c["head_dim"], c["hidden_size"])),
    "attn_v.weight": ("self_attn.v_proj.weight",
                      lambda c: (c["num_key_value_heads"] * c["head_dim"], c["hidden_size"])),
    "attn_output.weight": ("self_attn.o_proj.weight",
                           lambda c: (c["hidden_size"], c["num_attention_heads"] * c["head_dim"])),
    "ffn_norm.weight": ("post_attention_layernorm.weight", lambda c: (c["hidden_size"],)),
    "ffn_gate.weight": ("mlp.gate_proj.weight", lambda c: (c["intermediate_size"], c["hidden_size"])),
    "ffn_up.weight": ("mlp.up_proj.weight", lambda c: (c["intermediate_size"], c["hidden_size"])),
    "ffn_down.weight": ("mlp.down_proj.weight", lambda c: (c["hidden_size"], c["intermediate_size"])),
}
_TOP_TABLE: dict[str, tuple[str, _Shape]] = {
    "token_embd.weight": ("model.embed_tokens.weight", lambda c: (c["vocab_size"], c["hidden_size"])),
    "output_norm.weight": ("model.norm.weight", lambda c: (c["hidden_size"],)),
    "output.weight": ("lm_head.weight", lambda c: (c["vocab_size"], c["hidden_size"])),
}


def _expected_tensors(cfg: dict) -> dict[str, tuple[str, tuple]]:
    """GGUF name -> (HF name, torch shape) for every tensor the config implies."""
    out = {g: (hf, shape(cfg)) for g, (hf, shape) in _TOP_TABLE.items()}
    if cfg["tie_word_embeddings"]:
        del out["output.weight"]
    for i in range(cfg["num_hidden_layers"]):
        for suffix, (hf, shape) in _BLOCK_TABLE.items():
            out[f"blk.{i}.{suffix}"] = (f"model.layers.{i}.{hf}", shape(cfg))
    return out


def read_gguf(path: str | os.PathLike, reader=None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a Llama-architecture GGUF file.

    Returns `(hf_config, tensors)`: an HF `config.json` dict (model_type "llama") and float32 arrays under
    HF names in torch `(out, in)` layout — `model.embed_tokens.weight` [V, D], `model.layers.{i}.self_attn.
    q_proj.weight` [H*P, D], ..., `model.norm.weight` [D], and `lm_head.weight` [V, D] only when the file
    has `output.weight` (otherwise the embeddings are tied). Raises CheckpointError naming the file and
    every problem (missing/unexpected tensors, shape mismatches against the metadata). reader: `open_gguf(path)`
    when the caller has it open already (parsing the metadata takes seconds).
    """
    from gguf.quants import dequantize

    path = os.fspath(path)
    reader = open_gguf(path) if reader is None else reader
    cfg = _hf_config(reader, path)
    expected = _expected_tensors(cfg)
    by_name = {t.name: t for t in reader.tensors}
    problems = []
    missing = [g for g in expected if g not in by_name]
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(set(by_name) - set(expected))
    if "rope_freqs.weight" in unexpected:
        problems.append("rope_freqs.weight holds Llama-3.1-style rotary frequency factors, which l2m_jax "
                        "cannot express from a GGUF; load the model's HF directory instead")
    elif unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for g, (hf, shape) in expected.items():
        if g in by_name:
            got = tuple(int(n) for n in reversed(by_name[g].shape))  # GGUF lists dims innermost first
            if got != shape:
                problems.append(f"{g} has shape {got}, the metadata implies {shape}")
    if problems:
        raise CheckpointError(f"{path!r} is not a complete Llama checkpoint: " + "; ".join(problems))

    tensors: dict[str, np.ndarray] = {}
    for g, (hf, shape) in expected.items():
        t = by_name[g]
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{path!r}: tensor {g} uses quantisation {t.tensor_type.name}, which the "
                                  f"installed gguf package cannot dequantise ({e})") from e
        # copy: F32 tensors come back as views of the memory-mapped file
        w = np.array(w, dtype=np.float32, copy=True).reshape(shape)
        if g.endswith("attn_q.weight"):
            w = _unpermute_rope(w, cfg["num_attention_heads"])
        elif g.endswith("attn_k.weight"):
            w = _unpermute_rope(w, cfg["num_key_value_heads"])
        tensors[hf] = w
    return cfg, tensors
