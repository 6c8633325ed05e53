"""Training runs that go wrong: a NaN at step 3, a resume with changed optimizer settings, a metrics line torn
by a kill, a damaged metrics file, a truncated checkpoint, and TensorBoard events holding the JSONL's values."""
import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

import l2m_jax
from l2m_jax.config import ModelConfig
from l2m_jax.errors import CheckpointError
from l2m_jax.train import optim
from l2m_jax.train.loop import (ArrayBatches, CheckpointMismatchError, MetricsFileError, NonFiniteError,
                                Trainer)
from l2m_jax.train.report import read_metrics
from l2m_jax.train.stages import StageSettings, sft_stage
from tests.train.test_loop import TOY_MASK, toy_arrays, toy_loss, toy_params, toy_trainer

ROOT = Path(__file__).resolve().parents[2]


def trainer(tmp, *, lr=0.05, b1=0.9, clip=1.0, allow=False, **kw):
    """A toy Trainer whose config names its optimizer settings (as a stage's does)."""
    tx = optim.make_optimizer(lr=lr, betas=(b1, 0.999), clip_norm=clip, warmup_steps=1, total_steps=8)
    kw.setdefault("ckpt_dir", os.path.join(tmp, "ck"))
    return Trainer(toy_loss, toy_params(), TOY_MASK, tx, progress=False, rng=7,
                   config={"lr": lr, "b1": b1, "clip": clip}, allow_config_change=allow, **kw)


def nan_at_step_3():
    arrays = toy_arrays(n=16)
    arrays["scale"] = np.ones(16, np.float32)
    arrays["scale"][8:12] = np.nan                                          # the third batch of 4
    return ArrayBatches(arrays, batch_size=4)


def clean_data():
    arrays = toy_arrays(n=16)
    arrays["scale"] = np.ones(16, np.float32)
    return ArrayBatches(arrays, batch_size=4)


def numpy_tree(tree):
    return [np.array(x) for x in jax.tree.leaves(tree)]


def test_nan_without_a_checkpoint_says_a_rerun_starts_over(tmp_path):
    with trainer(str(tmp_path), save_every=10) as t:
        with pytest.raises(NonFiniteError) as info:
            t.fit(nan_at_step_3(), num_steps=6)
    e = info.value
    assert (e.step, e.metric, e.checkpoint_step) == (3, "loss", None)
    assert "step 3: metric 'loss' is nan" in str(e) and "no checkpoint is in" in str(e) and "step 0" in str(e)
    assert "Lower the learning rate" in str(e) and "intact" not in str(e) and e.set_aside == []
    with pytest.raises(NonFiniteError, match="has no ckpt_dir, so nothing was saved"):
        trainer(str(tmp_path), ckpt_dir=None).fit(nan_at_step_3(), num_steps=6)


def test_nan_sets_aside_the_checkpoint_that_would_replay_it(tmp_path):
    # the step-2 checkpoint holds the parameters step 3 started from: resumed, it would give the same nan
    with trainer(str(tmp_path), save_every=2) as t:
        with pytest.raises(NonFiniteError, match=r"moved aside; no other checkpoint is in .*ck: a re-run starts "
                                                 "from step 0") as info:
            t.fit(nan_at_step_3(), num_steps=6)
    assert info.value.set_aside == [str(tmp_path / "ck" / "2.nonfinite-1")] and info.value.checkpoint_step is None
    assert (tmp_path / "ck" / "2.nonfinite-1").is_dir() and trainer(str(tmp_path)).step == 0


@pytest.mark.parametrize("nan_step, set_aside, resumes", [(3, [2], 1), (4, [3, 2], 1)])
def test_with_accumulation_every_checkpoint_since_the_last_update_is_set_aside(tmp_path, nan_step, set_aside,
                                                                               resumes):
    # accum_steps=2: updates at micro-steps 2, 4, ...; steps 3 and 4 both start from the parameters of step 2
    arrays = toy_arrays(n=16)
    arrays["scale"] = np.ones(16, np.float32)
    arrays["scale"][4 * (nan_step - 1):4 * nan_step] = np.nan
    with toy_trainer(str(tmp_path), "ck", save_every=1) as t:
        with pytest.raises(NonFiniteError, match=f"newest checkpoint is step {resumes} in") as info:
            t.fit(ArrayBatches(arrays, batch_size=4), num_steps=6)
    assert info.value.set_aside == [str(tmp_path / "ck" / f"{s}.nonfinite-1") for s in set_aside]


def test_nan_names_the_checkpoint_and_resumes_with_changed_optimizer_settings(tmp_path):
    tmp = str(tmp_path)
    with trainer(tmp, save_every=1) as t:
        with pytest.raises(NonFiniteError, match=r"newest checkpoint is step 1 in .*ck: a re-run resumes") as info:
            t.fit(nan_at_step_3(), num_steps=6)
    assert info.value.checkpoint_step == 1
    with trainer(tmp) as same:
        saved = numpy_tree(same.trainable)                                  # the step-1 checkpoint
    with pytest.raises(CheckpointMismatchError, match="allow_config_change=True"):
        trainer(tmp, lr=0.01, b1=0.8)
    with pytest.raises(CheckpointMismatchError, match="allow_config_change cannot help"):
        trainer(tmp, clip=None, allow=True)                                 # no clipping: another state structure

    logs = os.path.join(tmp, "logs")
    with trainer(tmp, lr=0.01, b1=0.8, allow=True, log_dir=logs) as t:
        assert t.step == 1 and t.restore_info["config_changes"] == ["b1: 0.9 -> 0.8", "lr: 0.05 -> 0.01"]
        for a, b in zip(numpy_tree(t.trainable), saved):
            np.testing.assert_array_equal(a, b)
        # constant hyperparameters live in the optimizer state: the new beta1 replaces the saved one
        assert float(optax_get(t.state.opt_state, "b1")) == pytest.approx(0.8)
        history = t.fit(clean_data(), num_steps=4)
    assert [h["step"] for h in history] == [2, 3, 4] and all(np.isfinite(h["loss"]) for h in history)
    (entry,) = [json.loads(x) for x in open(os.path.join(logs, "config_history.jsonl"))]
    assert entry["step"] == 1 and entry["changes"] == ["b1: 0.9 -> 0.8", "lr: 0.05 -> 0.01"] and entry["time"]
    with trainer(tmp, lr=0.01, b1=0.8) as t:                               # the new checkpoint has the new config
        assert t.step == 4 and t.restore_info["config_changes"] == []


def optax_get(state, name):
    import optax
    return optax.tree_utils.tree_get(state, name, filtering=lambda _p, v: isinstance(v, jax.Array))


class Killed(ArrayBatches):
    """Dies when asked for its 4th batch (after the step-2 checkpoint and step 3's metrics line)."""

    def __next__(self):
        if self.state() == {"epoch": 0, "index": 3}:
            raise KeyboardInterrupt("killed")
        return super().__next__()


def test_a_torn_last_metrics_line_is_cut_and_the_resumed_metrics_are_right(tmp_path, caplog):
    tmp = str(tmp_path)
    with trainer(os.path.join(tmp, "full"), log_dir=os.path.join(tmp, "full")) as t:
        want = [h["loss"] for h in t.fit(clean_data(), num_steps=6)]
    logs = os.path.join(tmp, "logs")
    metrics = os.path.join(logs, "metrics.jsonl")
    with trainer(tmp, save_every=2, log_dir=logs) as t:
        with pytest.raises(KeyboardInterrupt):
            t.fit(Killed(toy_arrays(n=16) | {"scale": np.ones(16, np.float32)}, batch_size=4), num_steps=6)
    with open(metrics, "a") as f:
        f.write('{"loss": 2.5, "grad_no')                                   # the kill cut this write short
    with pytest.warns(UserWarning, match="cut off mid-write"):
        assert [h["step"] for h in read_metrics(metrics)] == [1, 2, 3]
    with caplog.at_level(logging.WARNING, logger="l2m_jax.train.loop"):
        t = trainer(tmp, save_every=2, log_dir=logs)
    assert any("cut off mid-write" in r.message for r in caplog.records)
    assert open(metrics).read().endswith("}\n")
    with t:
        assert t.step == 2
        t.fit(clean_data(), num_steps=6)
    got = read_metrics(metrics)                                             # no warning, no error
    assert [h["step"] for h in got] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal([h["loss"] for h in got], want)


def test_a_bad_metrics_line_before_the_last_is_a_clear_error(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    metrics = logs / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl line 2 is not valid JSON.*delete that line"):
        read_metrics(metrics)
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl line 2"):
        trainer(str(tmp_path), log_dir=logs)
    assert not (tmp_path / "ck").exists()                                   # it failed before any work


def damage(step_dir: Path, what: str) -> None:
    if what == "data":                                                      # the arrays' OCDBT data file
        (target,) = (step_dir / "state" / "d").iterdir()
    else:
        target = step_dir / "meta" / "metadata"
    with open(target, "r+b") as f:
        f.truncate(target.stat().st_size // 2)


@pytest.mark.parametrize("what", ["data", "metadata"])
def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, what):
    tmp = str(tmp_path)
    with trainer(tmp, save_every=2, max_to_keep=3) as t:
        t.fit(clean_data(), num_steps=4)
        at_4 = numpy_tree(t.trainable)
        t.fit(clean_data(), num_steps=6)
    ck = tmp_path / "ck"
    damage(ck / "6", what)
    with caplog.at_level(logging.WARNING, logger="l2m_jax.train.loop"):
        t = trainer(tmp, save_every=2, max_to_keep=3)
    with t:
        assert t.step == 4 and t.restore_info["step"] == 4
        (q,) = t.restore_info["quarantined"]
        assert q["step"] == 6 and q["moved_to"] == str(ck / "6.corrupt-1") and q["error"]
        assert (ck / "6.corrupt-1").is_dir() and not (ck / "6").exists()
        assert any("does not restore" in r.message and "6.corrupt-1" in r.message for r in caplog.records)
        for a, b in zip(numpy_tree(t.trainable), at_4):
            np.testing.assert_array_equal(a, b)
        t.fit(clean_data(), num_steps=6)                                    # and saves a new step 6
    assert sorted(p.name for p in ck.iterdir() if not p.name.startswith(".")) == ["2", "4", "6", "6.corrupt-1"]
    with trainer(tmp) as t:
        assert t.step == 6 and t.restore_info["quarantined"] == []


def test_no_restorable_checkpoint_is_one_error_naming_the_directory(tmp_path):
    tmp = str(tmp_path)
    with trainer(tmp, save_every=2) as t:
        t.fit(clean_data(), num_steps=4)
    for step in ("2", "4"):
        damage(tmp_path / "ck" / step, "metadata")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*ck restores \(step 4: .*step 2: .*corrupt"):
        trainer(tmp)
    with trainer(tmp) as t:                                                 # moved aside: a re-run starts over
        assert t.step == 0


# ------------------------------------------------------------------------------------------------ TensorBoard
def read_events(log_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalar summaries in a directory's TensorBoard event files (TFRecords)."""
    try:
        from tensorboardX.proto.event_pb2 import Event
    except ImportError:
        from tensorboard.compat.proto.event_pb2 import Event
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])           # after the length and its CRC
            pos += 12 + n + 4                                               # the record, then its CRC
            for v in event.summary.value:
                scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    return scalars


def test_a_stage_writes_tensorboard_events_holding_the_jsonl_values(tmp_path):
    cfg = ModelConfig.tiny(vocab_size=32, max_position_embeddings=16)
    params = l2m_jax.init_params(cfg, jax.random.key(0))
    r = np.random.default_rng(0)
    rows = {"tokens": r.integers(0, 32, (4, 16)).astype(np.int32), "loss_mask": np.ones((4, 16), bool)}
    settings = StageSettings(steps=3, batch_size=2, preset=optim.SFT.replace(lr=1e-3), progress=False)
    sft_stage((cfg, params), rows, settings, log_dir=tmp_path)
    assert list(tmp_path.glob("events.out.tfevents.*")), "no TensorBoard event files (is tensorboardX installed?)"
    events, jsonl = read_events(tmp_path), read_metrics(tmp_path / "metrics.jsonl")
    assert [h["step"] for h in jsonl] == [1, 2, 3]
    for name in ("loss", "grad_norm", "lr", "tokens_per_s"):
        assert events[name] == {h["step"]: pytest.approx(h[name], rel=1e-6) for h in jsonl}


# ------------------------------------------------------------------------------------------------ the CLI
# one stage-1 round on the tiny teacher (no stage 0, SFT or DPO), a checkpoint every step
CLI = ["teacher=tiny-random", "progress=false", "stage0.enabled=false", "sft.attn_fractions=[]", "dpo.enabled=false",
       "stage1.steps=6", "stage1.batch_size=2", "save_every=1", "data.max_prompts=6", "synth.num_requests=0",
       "pseudo_labels.max_new_tokens=8", "eval.tokens=64", "eval.window=32"]


def distill(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.zephyr_distill", *CLI, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_cli_nan_is_one_message_and_a_lower_lr_resumes_with_resume_with_changes(tmp_path):
    out = tmp_path / "run"
    nan = distill(f"out={out}", "stage1.lr=1e6")
    assert nan.returncode == 1, nan.stderr[-3000:]
    assert "Traceback" not in nan.stderr
    (line,) = [x for x in nan.stderr.splitlines() if x.startswith("error: ")]
    assert "error: stage1-mamba50: training stopped at step " in line and ("is nan" in line or "is inf" in line)
    assert "Lower stage1.lr (now 1e+06)" in line and "stage1.clip_norm (now 0.1)" in line
    assert "resume_with_changes=true" in line
    step = int(line.split("training stopped at step ")[1].split(":")[0])
    ckpt = out / "stages" / "stage1-mamba50" / "ckpt"
    saved = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    if saved:
        assert f"resumes this stage from its checkpoint at step {saved[-1]}" in line and saved[-1] < step
    else:
        assert "starts this stage from its beginning" in line

    refused = distill(f"out={out}", "stage1.lr=1e-3")
    assert refused.returncode == 2 and "add resume_with_changes=true" in refused.stderr
    not_optimisation = distill(f"out={out}", "stage1.lr=1e-3", "data.seq_len=64", "resume_with_changes=true")
    assert not_optimisation.returncode == 2 and "lets only optimisation settings change" in not_optimisation.stderr
    assert "data.seq_len: 128 -> 64" in not_optimisation.stderr and "stage1.lr" not in not_optimisation.stderr

    fixed = distill(f"out={out}", "stage1.lr=1e-3", "resume_with_changes=true")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "resume_with_changes: stage1.lr: 1000000.0 -> 0.001" in fixed.stdout
    if saved:
        assert f"stage1-mamba50: resumed step {saved[-1]} with changed settings" in fixed.stdout
        assert "lr: 1000000.0 -> 0.001" in fixed.stdout
    (entry,) = [json.loads(x) for x in (out / "config_history.jsonl").read_text().splitlines()]
    assert entry["changes"] == [{"key": "stage1.lr", "old": 1e6, "new": 1e-3}] and entry["time"]
    config = OmegaConf.load(out / "config.yaml")
    assert config.stage1.lr == 1e-3 and config.resume_with_changes is False
    history = read_metrics(out / "stages" / "stage1-mamba50" / "logs" / "metrics.jsonl")
    assert [h["step"] for h in history] == list(range(1, 7)) and all(np.isfinite(h["loss"]) for h in history)
    again = distill(f"out={out}", "stage1.lr=1e-3")                         # the new config.yaml: a plain re-run
    assert again.returncode == 0 and "stage1-mamba50: finished in an earlier run, skipped" in again.stdout
