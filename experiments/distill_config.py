"""Settings of `python -m experiments.zephyr_distill`: an OmegaConf structured config, YAML presets, checks.

A preset from experiments/configs/NAME.yaml (`preset=NAME` or `--preset NAME`; a .yaml path works too) is merged
onto the defaults below, then `key=value` overrides; an unknown key or a badly typed value is a UsageError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from l2m_jax.recipe.config import RecipeConfig, UsageError, check_config  # noqa: F401

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
NOT_COMPARED = ("out", "progress", "verbose")      # may differ between a run and its resumption


# ------------------------------------------------------------------------------------------------ config
Config = RecipeConfig     # the structured config's schema (l2m_jax.recipe.config)
GPU_PRESET, CPU_PRESET = "smollm2-gpu", "smollm2"


def choose_preset() -> tuple[str, str]:
    """(preset, why): the one-GPU preset where JAX sees a GPU, else the 2-core CPU preset."""
    import jax

    devices = jax.devices()
    if devices[0].platform == "gpu":
        return GPU_PRESET, f"JAX sees {len(devices)} GPU(s) ({devices[0].device_kind})"
    return CPU_PRESET, f"JAX sees no GPU (platform {devices[0].platform}); the CPU-sized preset"


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


def load_config(argv: list[str]) -> tuple[DictConfig, str]:
    """(config, how the preset was chosen): defaults <- the preset's YAML <- `key=value` overrides.

    Without preset= the machine decides (`choose_preset`). Raises UsageError naming the bad input.
    """
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
    if cli.get("preset") is None:
        preset, why = choose_preset()
        choice = f"preset {preset} chosen: {why} (preset=NAME overrides)"
        cli.preset = preset
    else:
        preset = str(cli.preset)
        choice = f"preset {preset}, as given"
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
    return cfg, choice


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
