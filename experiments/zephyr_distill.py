"""The whole recipe: teacher -> chat data (synthesised + seed prompts) -> stage 0 -> stage 1 (progressive)
-> SFT rounds -> DPO -> checkpoints + report.

    python -m experiments.zephyr_distill                                  # a preset sized for this machine
    python -m experiments.zephyr_distill preset=smollm2                   # the 2-core CPU preset
    python -m experiments.zephyr_distill preset=zephyr-7b teacher=/models/zephyr-7b-beta
    python -m experiments.zephyr_distill stage1.steps=8 sft.steps=8 dpo.steps=4 out=runs/quick

Without preset= the machine decides: `smollm2-gpu` where JAX sees a GPU (the whole recipe in under 9 minutes
on one H200), else `smollm2` (about 10 minutes on 2 CPU cores); the log says which and why. Settings are an
OmegaConf structured config (`l2m_jax.recipe.RecipeConfig`): a preset from experiments/configs/NAME.yaml (a
.yaml path works too) merged onto the defaults, then `key=value` overrides. An unknown key or a badly typed
value is an error. `teacher=tiny-random` builds a tiny random teacher with a byte-level ChatML tokenizer: a
test / debugging option that runs every step of the pipeline in seconds.

Everything lands in `out` (default runs/PRESET): config.yaml, chat/ (the teacher's data), stages/NAME/{model,
logs,done.json}, final/{l2m,mil}, plots/*.png, report.md and report.json. Running the same command again skips
finished stages and resumes the unfinished one from its last checkpoint; a different config for the same `out`
is refused, except for optimisation settings with `resume_with_changes=true` (a stage's lr, betas, eps,
weight_decay, clip_norm, warmup_steps, warmup_ratio, and steps of a stage kind not yet finished; recorded in
out/config_history.jsonl), e.g. after a NaN loss, the same command with a lower learning rate:

    python -m experiments.zephyr_distill out=runs/quick stage1.lr=1e-4 resume_with_changes=true

A damaged newest checkpoint is moved aside (`<step>.corrupt-<n>`) and the one before it resumed. The steps
themselves are library functions (`l2m_jax.recipe`) a research script can call one by one.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.distill_config import Config, UsageError, check_config, check_out_dir, load_config
from l2m_jax.recipe.data import say


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("Defaults (experiments/configs/smollm2.yaml restates them):\n")
        print(OmegaConf.to_yaml(OmegaConf.structured(Config)))
        return 0
    try:
        c, choice = load_config(argv)
        check_config(c)
        out = check_out_dir(c)
        say(f"zephyr_distill: {choice}")
        return _run(c, out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(c: DictConfig, out: Path) -> int:
    from l2m_jax.assets import AssetError
    from l2m_jax.config import ConfigError
    from l2m_jax.data.chat import DataError
    from l2m_jax.data.tokenizer import TokenizerError
    from l2m_jax.errors import CheckpointError
    from l2m_jax.recipe import pipeline
    from l2m_jax.train.loop import CheckpointMismatchError, MetricsFileError, NonFiniteError
    from l2m_jax.train.stages import StageError

    logging.basicConfig(level=logging.INFO if c.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        pipeline(c, out)
    except (DataError, ConfigError, TokenizerError, CheckpointError, CheckpointMismatchError, StageError,
            AssetError, MetricsFileError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
