"""Frozen, hashable configurations.

`ModelConfig` describes one CausalLM: the Llama/Mistral trunk plus a per-layer mixer kind
("attention" | "mamba" | "mamba2"). The teacher is the all-attention case. `from_hf` is the only place
where HF config key names appear (the GGUF reader produces an HF-style dict and goes through it too).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

MIXERS = ("attention", "mamba", "mamba2")
_PATTERN_LETTER = {"attention": "A", "mamba": "M", "mamba2": "S"}


class ConfigError(ValueError):
    """A configuration that l2m_jax cannot build a model from."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3")."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class SSMConfig:
    """Settings shared by every Mamba layer of a hybrid (MIL_SPEC §1.4/§1.5).

    d_inner = H·P (the C / z / output width), d_xb = G·P (the x / B width, copied from V / K).
    Mamba2: heads = H, head_dim = P, d_state = P. Mamba-1: d_state = 16, per-channel state,
    dt_rank = ceil(D / 16).
    """
    d_inner: int
    d_xb: int
    d_state: int
    n_heads: int          # Mamba2: SSM heads (= attention heads); Mamba-1: unused by the math
    head_dim: int         # P
    d_conv: int = 4
    dt_rank: int = 0      # Mamba-1 only
    chunk_size: int = 256
    norm_eps: float = 1e-5
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4

    @property
    def conv_dim_mamba2(self) -> int:
        # depthwise conv over concat[x, B, C] (before the GQA repeat)
        return 2 * self.d_xb + self.d_inner

    @property
    def in_proj_dim_mamba2(self) -> int:
        # rows z | x | B | C | dt
        return 2 * self.d_inner + 2 * self.d_xb + self.n_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_embeddings: bool = False
    model_type: str = "llama"            # "llama" | "mistral": the HF family for export
    layer_mixers: tuple[str, ...] = ()   # per layer; empty means all attention
    ssm: SSMConfig | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"               # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self):
        if not self.layer_mixers:
            object.__setattr__(self, "layer_mixers", ("attention",) * self.n_layers)
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def attn_layers(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.layer_mixers) if m == "attention")

    @property
    def ssm_layers(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.layer_mixers) if m != "attention")

    @property
    def pattern(self) -> str:
        """The layer mix as a string: A attention, M Mamba-1, S Mamba2 (SSD)."""
        return "".join(_PATTERN_LETTER[m] for m in self.layer_mixers)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        problems = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if len(self.layer_mixers) != self.n_layers:
            problems.append(f"layer_mixers has {len(self.layer_mixers)} entries for n_layers={self.n_layers}")
        bad = sorted({m for m in self.layer_mixers if m not in MIXERS})
        if bad:
            problems.append(f"unknown mixer kind(s) {bad}; choose from {MIXERS}")
        ssm_kinds = sorted({m for m in self.layer_mixers if m != "attention"})
        if ssm_kinds and self.ssm is None:
            problems.append("the config has Mamba layers but no `ssm` settings")
        if len(ssm_kinds) > 1:
            problems.append(f"one SSM variant per model, got {ssm_kinds}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            problems.append(f"sliding_window={self.sliding_window} must be positive or None")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                problems.append(f"{name}={getattr(self, name)!r}; use float32, bfloat16 or float16")
        if problems:
            raise ConfigError("invalid ModelConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **kw) -> "ModelConfig":
        """A few-kilobyte model for tests."""
        base = dict(vocab_size=128, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                    ffn_dim=128, rope_theta=10000.0, max_position_embeddings=256)
        base.update(kw)
        return cls(**base)

    @classmethod
    def llama3_8b(cls, **kw) -> "ModelConfig":
        base = dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                    ffn_dim=14336, rms_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                    bos_token_id=128000, eos_token_id=128009, dtype="bfloat16", param_dtype="bfloat16")
        base.update(kw)
        return cls(**base)

    @classmethod
    def zephyr_7b(cls, **kw) -> "ModelConfig":
        base = dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                    ffn_dim=14336, rms_eps=1e-5, rope_theta=10000.0, max_position_embeddings=32768,
                    sliding_window=4096, model_type="mistral", bos_token_id=1, eos_token_id=2,
                    dtype="bfloat16", param_dtype="bfloat16")
        base.update(kw)
        return cls(**base)

    @classmethod
    def smollm2_135m(cls, **kw) -> "ModelConfig":
        base = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                    ffn_dim=1536, rms_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                    tie_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        base.update(kw)
        return cls(**base)

    # ------------------------------------------------------------------ HF adapter
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | os.PathLike, **kw) -> "ModelConfig":
        """Build from an HF `config.json` dict (or the directory / file holding it)."""
        source = "config dict"
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            with open(path) as f:
                hf = json.load(f)
        model_type = hf.get("model_type")
        if model_type not in ("llama", "mistral"):
            raise ConfigError(f"{source}: model_type={model_type!r} is not supported; l2m_jax loads "
                              "Llama and Mistral models (model_type 'llama' or 'mistral')")
        try:
            d_model = int(hf["hidden_size"])
            n_heads = int(hf["num_attention_heads"])
            n_kv = int(hf.get("num_key_value_heads") or n_heads)
            head_dim = int(hf.get("head_dim") or d_model // n_heads)
            vals = dict(vocab_size=int(hf["vocab_size"]), d_model=d_model, n_layers=int(hf["num_hidden_layers"]),
                        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, ffn_dim=int(hf["intermediate_size"]))
        except KeyError as e:
            raise ConfigError(f"{source}: missing required key {e.args[0]!r}") from None
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r}; only SwiGLU (silu) MLPs are supported")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError(f"{source}: attention/MLP biases are not supported (Llama/Mistral have none)")
        rope_params = hf.get("rope_parameters") or {}
        theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type") not in (None, "default")
                                             else None)
        rs = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                rs = RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                 float(scaling["high_freq_factor"]),
                                 int(scaling["original_max_position_embeddings"]))
            elif kind not in (None, "default"):
                raise ConfigError(f"{source}: rope scaling type {kind!r} is not supported (only 'llama3')")

        def _id(v):
            if isinstance(v, list):
                return int(v[0]) if v else None
            return None if v is None else int(v)

        sliding = hf.get("sliding_window") if model_type == "mistral" else None
        vals.update(rms_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=float(theta), rope_scaling=rs,
                    max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                    sliding_window=None if sliding is None else int(sliding),
                    tie_embeddings=bool(hf.get("tie_word_embeddings", False)), model_type=model_type,
                    bos_token_id=_id(hf.get("bos_token_id")), eos_token_id=_id(hf.get("eos_token_id")),
                    pad_token_id=_id(hf.get("pad_token_id")))
        vals.update(kw)
        return cls(**vals)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` of the attention trunk (what MiL stores beside `mamba_config.json`)."""
        arch = "MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"
        out = dict(architectures=[arch], model_type=self.model_type, vocab_size=self.vocab_size,
                   hidden_size=self.d_model, num_hidden_layers=self.n_layers,
                   num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                   head_dim=self.head_dim, intermediate_size=self.ffn_dim, hidden_act="silu",
                   rms_norm_eps=self.rms_eps, rope_theta=self.rope_theta,
                   max_position_embeddings=self.max_position_embeddings,
                   tie_word_embeddings=self.tie_embeddings, bos_token_id=self.bos_token_id,
                   eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                   attention_bias=False, mlp_bias=False, torch_dtype=self.param_dtype)
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(rope_type="llama3", **dataclasses.asdict(self.rope_scaling))
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return out

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if d.get("ssm") is not None:
            d["ssm"] = SSMConfig(**d["ssm"])
        d["layer_mixers"] = tuple(d.get("layer_mixers", ()))
        return cls(**d)


def default_ssm_config(cfg: ModelConfig, mixer: str) -> SSMConfig:
    """MiL's settings for a student built from `cfg` (MIL_SPEC §1.1, §1.4, §1.5)."""
    if mixer == "mamba2":
        return SSMConfig(d_inner=cfg.q_dim, d_xb=cfg.kv_dim, d_state=cfg.head_dim, n_heads=cfg.n_heads,
                         head_dim=cfg.head_dim)
    if mixer == "mamba":
        return SSMConfig(d_inner=cfg.q_dim, d_xb=cfg.kv_dim, d_state=16, n_heads=cfg.n_heads,
                         head_dim=cfg.head_dim, dt_rank=math.ceil(cfg.d_model / 16))
    raise ConfigError(f"unknown mixer {mixer!r}; choose 'mamba' or 'mamba2'")
