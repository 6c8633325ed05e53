"""Settings of `python -m experiments.zephyr_distill`: an OmegaConf structured config, YAML presets, checks.

A preset from experiments/configs/NAME.yaml (`preset=NAME` or `--preset NAME`; a .yaml path works too) is merged
onto the defaults below, then `key=value` overrides; an unknown key or a badly typed value is a UsageError.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SPECIAL_SOURCES = {"prompts": ("chatterbot",), "sft": ("chatterbot", "pseudo_labels"), "preferences": ("synthetic",)}
NOT_COMPARED = ("out", "progress", "verbose")      # may differ between a run and its resumption


# ------------------------------------------------------------------------------------------------ config
@dataclasses.dataclass
class MeshConfig:
    data: Optional[int] = None           # null: every local device not used by fsdp
    fsdp: int = 1


@dataclasses.dataclass
class PseudoLabelConfig:
    max_new_tokens: int = 64
    batch_size: int = 64
    temperature: float = 0.0             # 0: greedy
    top_p: float = 1.0


@dataclasses.dataclass
class DataConfig:
    prompts: List[str] = field(default_factory=lambda: ["chatterbot"])   # or l2m_jax.data.sources specs
    max_prompts: Optional[int] = 192     # the first N seed prompts (null: all)
    max_prompt_len: Optional[int] = None  # longer prompts are dropped (null: seq_len - max_new_tokens)
    sft: List[str] = field(default_factory=lambda: ["chatterbot", "pseudo_labels"])
    max_sft_rows: Optional[int] = None   # per dataset source
    preferences: List[str] = field(default_factory=lambda: ["synthetic"])
    max_preference_rows: Optional[int] = None
    synthetic_mode: str = "mixed"        # how synthetic rejections are made (l2m_jax.data.preference)
    seq_len: int = 128
    truncate: bool = False               # cut over-long examples instead of dropping them
    packing: bool = False                # SFT: concatenate conversations into seq_len blocks (MiL/TRL packing)


@dataclasses.dataclass
class StageConfig:
    steps: Optional[int] = 24            # optimizer updates (null: one epoch of the stage's data)
    batch_size: int = 2                  # rows per micro-batch, over all devices
    accum_steps: int = 1
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: Optional[float] = 1.0
    warmup_steps: Optional[int] = None   # exactly one of warmup_steps / warmup_ratio
    warmup_ratio: Optional[float] = 0.1


@dataclasses.dataclass
class Stage1Config(StageConfig):
    attn_fractions: List[float] = field(default_factory=lambda: [0.75, 0.5])   # [] skips stage 1
    stepwise: bool = False               # one layer per round (MiL's stepwise order) instead
    steps: Optional[int] = 64            # per round
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    clip_norm: Optional[float] = 0.1
    warmup_steps: Optional[int] = 4
    warmup_ratio: Optional[float] = None
    alpha: float = 1.0                   # CE weight
    beta: float = 1.0                    # KL weight
    kl_reduction: str = "token_mean"     # or "mil": summed over positions and vocab / batch size, unmasked
    temperature: float = 1.0


@dataclasses.dataclass
class SftConfig(StageConfig):
    attn_fractions: List[float] = field(default_factory=lambda: [0.5])   # append 0.25, 0.125, 0.0 for more rounds
    steps: Optional[int] = 32
    lr: float = 5e-5


@dataclasses.dataclass
class DpoConfig(StageConfig):
    enabled: bool = True
    steps: Optional[int] = 16
    lr: float = 5e-6
    beta: float = 0.1
    reference: str = "teacher"           # or "sft": a frozen copy of the student entering DPO
    max_len: Optional[int] = None        # null: data.seq_len
    max_prompt_len: Optional[int] = None  # null: max_len // 2 (longer prompts are cut from the left)


@dataclasses.dataclass
class EvalConfig:
    tokens: int = 1024                   # held-out tokens scored
    window: int = 256


@dataclasses.dataclass
class Config:
    preset: str = "smollm2"
    teacher: str = "smollm2"             # l2m_jax.load path or name; "tiny-random" for tests and debugging
    tokenizer: Optional[str] = None      # null: the teacher's
    dtype: Optional[str] = None          # load the teacher in this dtype (bfloat16 on GPUs)
    mixer: str = "mamba2"                # "mamba2" or "mamba" (MiL's Mamba-1)
    out: str = "runs/${preset}"
    seed: int = 0
    progress: bool = True
    verbose: bool = False                # log every parameter's shape and sharding
    save_every: int = 200
    keep_checkpoints: bool = False       # keep a finished stage's optimizer checkpoint
    mesh: MeshConfig = field(default_factory=MeshConfig)
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    sft: SftConfig = field(default_factory=SftConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class UsageError(ValueError):
    """A command line or configuration that cannot run."""


def _config_error(source: str, e: OmegaConfBaseException) -> UsageError:
    msg = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    if key and type(e).__name__ == "ConfigKeyError":
        parent = key.rpartition(".")[0]
        node = OmegaConf.structured(Config)
        for part in parent.split(".") if parent else ():
            node = node.get(part) if isinstance(node, DictConfig) else None
        known = sorted(node.keys()) if isinstance(node, DictConfig) else []
        return UsageError(f"{source}: unknown config key {key!r} ({msg}); the keys of "
                          f"{parent or 'the top level'} are {known}")
    return UsageError(f"{source}: {msg}" + (f" (key {key})" if key and key not in msg else ""))


def _preset_path(name: str) -> Path:
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
    else:
        path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise UsageError(f"preset {name!r}: no file {path}; choose one of {known} or pass a .yaml path")
    return path


def load_config(argv: list[str]) -> DictConfig:
    """Defaults <- the preset's YAML <- `key=value` overrides; raises UsageError naming the bad input."""
    args = list(argv)
    for i, a in enumerate(list(args)):
        if a == "--preset":
            if i + 1 >= len(args):
                raise UsageError("--preset needs a name, e.g. --preset smollm2")
            args[i:i + 2] = [f"preset={args[i + 1]}", ""]
        elif a.startswith("--preset="):
            args[i] = a[2:]
    args = [a for a in args if a]
    bad = [a for a in args if "=" not in a or a.startswith("-")]
    if bad:
        raise UsageError(f"arguments {bad} are not key=value overrides; see --help")
    try:
        cli = OmegaConf.from_dotlist(args)
    except OmegaConfBaseException as e:
        raise _config_error("command line", e) from None
    cfg = OmegaConf.structured(Config)
    preset = str(cli.get("preset", cfg.preset))
    path = _preset_path(preset)
    try:
        preset_cfg = OmegaConf.load(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable YAML config ({e})") from None
    for source, layer in ((str(path), preset_cfg), ("command line", cli)):
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise _config_error(source, e) from None
    # a "???" in the preset does not override the default when merged: the preset's required keys are
    # the ones it leaves "???" and the command line does not set
    missing = sorted(k for k in OmegaConf.missing_keys(preset_cfg) | OmegaConf.missing_keys(cfg)
                     if OmegaConf.select(cli, k, default=None) is None)
    if missing:
        raise UsageError(f"preset {preset!r} needs {missing} on the command line, e.g. "
                         f"{missing[0]}=/path/to/the/checkpoint")
    return cfg


def check_config(c: DictConfig) -> None:
    """Value checks OmegaConf's types cannot express; each error names the key."""
    problems = []
    if c.mixer not in ("mamba", "mamba2"):
        problems.append(f"mixer={c.mixer!r}: choose 'mamba2' or 'mamba'")
    if c.stage1.kl_reduction not in ("token_mean", "mil"):
        problems.append(f"stage1.kl_reduction={c.stage1.kl_reduction!r}: choose 'token_mean' or 'mil'")
    if c.dpo.reference not in ("teacher", "sft"):
        problems.append(f"dpo.reference={c.dpo.reference!r}: choose 'teacher' or 'sft'")
    for name in ("stage1", "sft", "dpo"):
        s = c[name]
        if s.steps is not None and s.steps < 1:
            problems.append(f"{name}.steps={s.steps} must be >= 1 (or null for one epoch)")
        if s.batch_size < 1 or s.accum_steps < 1:
            problems.append(f"{name}.batch_size and {name}.accum_steps must be >= 1")
        if (s.warmup_steps is None) == (s.warmup_ratio is None):
            problems.append(f"{name}: set exactly one of warmup_steps and warmup_ratio (the other to null)")
        if len(s.betas) != 2:
            problems.append(f"{name}.betas must be two numbers, got {list(s.betas)}")
    needs_labels = (bool(c.stage1.attn_fractions) or "pseudo_labels" in c.data.sft
                    or "synthetic" in c.data.preferences)
    for key, needed in (("prompts", needs_labels), ("sft", bool(c.sft.attn_fractions)),
                        ("preferences", c.dpo.enabled)):
        if needed and not c.data[key]:
            problems.append(f"data.{key} is empty; name at least one source")
    if c.data.max_prompts is not None and c.data.max_prompts < 1:
        problems.append(f"data.max_prompts={c.data.max_prompts} must be positive (or null for all)")
    if c.data.seq_len < 8:
        problems.append(f"data.seq_len={c.data.seq_len} is too short")
    if c.eval.tokens < 2 or c.eval.window < 2:
        problems.append("eval.tokens and eval.window must be >= 2")
    if problems:
        raise UsageError("invalid configuration: " + "; ".join(problems))


def check_out_dir(c: DictConfig) -> Path:
    """Create `out` with config.yaml, or check that an existing one was made with the same settings."""
    out = Path(c.out)
    saved = out / "config.yaml"
    now = OmegaConf.to_container(c, resolve=True)
    if saved.exists():
        old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        diffs = _diff(old, now)
        if diffs:
            raise UsageError(f"out={out} holds a run made with a different configuration ({'; '.join(diffs[:8])}); "
                             "re-run with the original settings to resume, or choose a new out=")
        return out
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(now), saved)
    return out


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if not prefix and k in NOT_COMPARED:
                continue
            out += _diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]
