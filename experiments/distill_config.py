"""Settings of `python -m experiments.zephyr_distill`: an OmegaConf structured config, YAML presets, checks.

A preset from experiments/configs/NAME.yaml (`preset=NAME` or `--preset NAME`; a .yaml path works too) is merged
onto the defaults below, then `key=value` overrides; an unknown key or a badly typed value is a UsageError.

An `out` remembers its settings in config.yaml and refuses others, except that `resume_with_changes=true` accepts
changed optimisation settings (`CHANGEABLE_ON_RESUME` of any stage, and `steps` of a stage kind with no finished
stage): config.yaml is rewritten and the change appended to out/config_history.jsonl.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from l2m_jax.recipe.config import (CHANGEABLE_ON_RESUME, STAGE_KINDS, RecipeConfig, UsageError,  # noqa: F401
                                   check_config)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# may differ between a run and its resumption
NOT_COMPARED = ("out", "progress", "verbose", "resume_with_changes", "compile_ahead", "kernels")


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
    """Create `out` with config.yaml, or check that an existing one was made with the same settings.

    With resume_with_changes=true, changed optimisation settings are accepted and recorded (see the module doc).
    """
    out = Path(c.out)
    saved = out / "config.yaml"
    now = OmegaConf.to_container(c, resolve=True)
    if saved.exists():
        old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        diffs = _diff(old, now)
        if diffs and not c.resume_with_changes:
            raise UsageError(f"out={out} holds a run made with a different configuration "
                             f"({'; '.join(_fmt(diffs[:8]))}); re-run with the original settings to resume, or "
                             "choose a new out=; to resume with changed optimisation settings (e.g. a lower lr "
                             "after a NaN) add resume_with_changes=true")
        if diffs:
            _accept_changes(out, diffs, now)
        return out
    out.mkdir(parents=True, exist_ok=True)
    _save_config(saved, now)
    return out


def _save_config(path: Path, config: dict) -> None:
    # the override is an action, recorded in config_history.jsonl, not a setting of the run
    OmegaConf.save(OmegaConf.create({**config, "resume_with_changes": False}), path)


def _finished_kinds(out: Path) -> set[str]:
    kinds = set()
    for done in (out / "stages").glob("*/done.json"):
        try:
            kinds.add(json.loads(done.read_text())["kind"])
        except (OSError, ValueError, KeyError):
            raise UsageError(f"{done} is unreadable; delete it to train that stage again") from None
    return kinds


def _changeable(key: str, finished: set[str]) -> bool:
    kind, _, name = key.partition(".")
    if kind not in STAGE_KINDS:
        return False
    return name in CHANGEABLE_ON_RESUME or (name == "steps" and kind not in finished)


def _accept_changes(out: Path, diffs: list[tuple[str, Any, Any]], now: dict) -> None:
    """resume_with_changes=true: refuse non-optimisation changes, else record them and rewrite config.yaml."""
    finished = _finished_kinds(out)
    refused = [d for d in diffs if not _changeable(d[0], finished)]
    if refused:
        raise UsageError(
            f"out={out}: resume_with_changes=true lets only optimisation settings change (STAGE.{{"
            f"{','.join(CHANGEABLE_ON_RESUME)}}} for STAGE in {list(STAGE_KINDS)}, and STAGE.steps while no "
            f"stage of that kind has finished; finished: {sorted(finished) or 'none'}), but these differ too: "
            f"{'; '.join(_fmt(refused[:8]))}; re-run with their original values, or choose a new out=")
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "changes": [{"key": k, "old": a, "new": b} for k, a, b in diffs]}
    with open(out / "config_history.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    _save_config(out / "config.yaml", now)
    print(f"resume_with_changes: {'; '.join(_fmt(diffs))}; {out / 'config.yaml'} updated, the change recorded "
          f"in {out / 'config_history.jsonl'}", flush=True)


def _fmt(diffs: list[tuple[str, Any, Any]]) -> list[str]:
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs]


def _diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every leaf that differs, keys dotted, NOT_COMPARED top-level keys left out."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if not prefix and k in NOT_COMPARED:
                continue
            out += _diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [(prefix[:-1], old, new)]
