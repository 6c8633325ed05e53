"""Mesh construction, sharding rules, and sharded training == single-device training."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from l2m_jax import parallel
from l2m_jax.config import ModelConfig, default_ssm_config
from l2m_jax.models import abstract_params


def test_make_mesh_defaults_and_validation():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1}
    with pytest.raises(ValueError, match="does not match"):
        parallel.make_mesh(data=2, fsdp=1)
    with pytest.raises(ValueError, match="divisor"):
        parallel.make_mesh(fsdp=3)


def test_logical_specs_and_collisions():
    assert parallel.logical_to_spec(("batch", "length", None)) == P(("data", "fsdp"), None, None)
    assert parallel.logical_to_spec(("embed", "mlp")) == P("fsdp", None)
    # batch and embed both use "fsdp": an activation [B, L, D] must not name its D "embed"
    with pytest.raises(ValueError, match="fsdp"):
        parallel.logical_to_spec(("batch", "length", "embed"))
    with pytest.raises(ValueError, match="no sharding rule"):
        parallel.logical_to_spec(("embedding",))


def _specs(tree):
    return {parallel.path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_param_shardings_follow_the_rules():
    cfg = ModelConfig.tiny(n_layers=2, vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16,
                           ffn_dim=64)
    cfg = cfg.replace(layer_mixers=("attention", "mamba2"), ssm=default_ssm_config(cfg, "mamba2"))
    params = abstract_params(cfg)
    mesh = AbstractMesh((4, 2), ("data", "fsdp"))
    specs = _specs(parallel.param_shardings(params, mesh, min_size=0))
    assert specs["embed/embedding"] == P(None, "fsdp")                 # [V, D]: D over fsdp
    assert specs["lm_head/kernel"] == P("fsdp", None)
    assert specs["layers/0/mixer/o/kernel"] == P(None, "fsdp")
    assert specs["layers/1/mixer/in_proj/kernel"] == P("fsdp", None)
    assert specs["layers/1/mlp/down/kernel"] == P(None, "fsdp")
    assert specs["layers/1/mixer/conv/kernel"] == P(None, None)        # no d_model side: replicated
    assert specs["layers/1/mixer/A_log"] == P() and specs["final_norm/scale"] == P()   # 1-D
    # small leaves replicate under the default size threshold
    assert all(s == P() or all(a is None for a in s)
               for s in _specs(parallel.param_shardings(params, mesh, min_size=10 ** 6)).values())
    # optimizer moments get their parameter's sharding
    opt = jax.eval_shape(optax.adam(1e-3).init, params)
    opt_specs = _specs(parallel.param_shardings(opt, mesh, min_size=0))
    assert opt_specs["0/mu/layers/1/mixer/in_proj/kernel"] == P("fsdp", None)
    assert opt_specs["0/nu/embed/embedding"] == P(None, "fsdp")


def test_param_shardings_fallbacks_and_errors():
    mesh = AbstractMesh((2, 4), ("data", "fsdp"))
    tree = {"toy": {"w": jax.ShapeDtypeStruct((6, 8), np.float32), "odd": jax.ShapeDtypeStruct((3, 5), np.float32)},
            "up": {"kernel": jax.ShapeDtypeStruct((30, 16), np.float32)}}   # embed=30 not divisible by 4
    specs = _specs(parallel.param_shardings(tree, mesh, min_size=0))
    assert specs == {"toy/w": P(None, "fsdp"), "toy/odd": P(), "up/kernel": P(None, "fsdp")}
    clash = parallel.DEFAULT_RULES + (("mlp", "fsdp"),)
    with pytest.raises(ValueError, match="up/kernel"):
        parallel.param_shardings({"up": {"kernel": jax.ShapeDtypeStruct((8, 8), np.float32)}}, mesh, clash,
                                 min_size=0)
    with pytest.raises(ValueError, match="tensor"):
        parallel.param_shardings(tree, mesh, (("embed", "tensor"),))
    assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))


_SHARDED_RUN = textwrap.dedent("""
    import json, jax, numpy as np
    import l2m_jax
    from l2m_jax import parallel
    from l2m_jax.config import ModelConfig, default_ssm_config
    from l2m_jax.train import losses, optim
    from l2m_jax.train.loop import ArrayBatches, Trainer

    assert len(jax.devices()) == 8
    t_cfg = ModelConfig.tiny(n_layers=2, vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16,
                             ffn_dim=64)
    s_cfg = t_cfg.replace(layer_mixers=("attention", "mamba2"), ssm=default_ssm_config(t_cfg, "mamba2"))
    params = {"student": l2m_jax.init_params(s_cfg, jax.random.key(0)),
              "teacher": l2m_jax.init_params(t_cfg, jax.random.key(1))}
    mask = {"student": optim.trainable_mask(params["student"], s_cfg, "stage1"),
            "teacher": jax.tree.map(lambda _: False, params["teacher"])}

    def loss_fn(p, batch, rng):
        student, _ = l2m_jax.forward(s_cfg, p["student"], batch["tokens"])
        teacher, _ = l2m_jax.forward(t_cfg, p["teacher"], batch["tokens"])
        targets, tmask = losses.shift_for_next_token(batch["tokens"], batch["mask"])
        return losses.stage1_loss(student, teacher, targets, tmask, kl_reduction="mil")

    rng = np.random.default_rng(0)
    arrays = {"tokens": rng.integers(0, 64, (16, 12)).astype(np.int32), "mask": rng.random((16, 12)) < 0.8}
    out = {}
    for name, mesh in [("1", parallel.make_mesh(devices=jax.devices()[:1])), ("4x2", parallel.make_mesh(4, 2)),
                       ("8x1", parallel.make_mesh(8, 1))]:
        tx = optim.make_optimizer(lr=1e-2, clip_norm=1.0, warmup_steps=0, total_steps=3)
        trainer = Trainer(loss_fn, params, mask, tx, mesh, progress=False, min_shard_size=0)
        hist = trainer.fit(ArrayBatches(arrays, batch_size=8), num_steps=3)
        w = trainer.trainable["student"]["layers"][1]["mixer"]["in_proj"]["kernel"]
        out[name] = {"loss": [h["loss"] for h in hist], "kl": [h["kl"] for h in hist],
                     "spec": str(w.sharding.spec), "shard_rows": w.addressable_shards[0].data.shape[0],
                     "final": np.asarray(w).ravel()[:64].tolist()}
    print("RESULT" + json.dumps(out))
""")


def test_sharded_training_equals_single_device():
    # the same XLA flags for every mesh; -O0 only to compile faster
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", XLA_FLAGS=flags)
    proc = subprocess.run([sys.executable, "-c", _SHARDED_RUN], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    ref = out["1"]
    assert out["4x2"]["spec"] == str(P("fsdp", None)) and out["4x2"]["shard_rows"] == 16   # really split
    assert out["8x1"]["shard_rows"] == 32
    assert ref["loss"][0] != ref["loss"][-1]
    for name in ("4x2", "8x1"):
        np.testing.assert_allclose(out[name]["loss"], ref["loss"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[name]["kl"], ref["kl"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[name]["final"], ref["final"], rtol=1e-5, atol=1e-6)


_FSDP_STEP = textwrap.dedent("""
    import json, re, jax, numpy as np, optax
    from experiments import compile_8b as c
    from l2m_jax import parallel
    from l2m_jax.models import init_params
    from l2m_jax.train.optim import split_trainable, trainable_mask

    assert len(jax.devices()) == 8
    t_cfg, s_cfg = c.configs("tiny", 2)   # bf16 teacher, one Mamba2 layer with fp32 trainable mixers
    out = {"temporaries": {}}
    for d, f in [(8, 1), (2, 4), (1, 8)]:   # one row of 256 tokens per device on every mesh
        compiled, _ = c.compile_step(t_cfg, s_cfg, parallel.make_mesh(d, f), 8, 256, loss_chunk=64)
        out["temporaries"][f"{d}x{f}"] = compiled.memory_analysis().temp_size_in_bytes
    # an activation of all 8 rows, [8, 256, ...], on one device of the fsdp-8 mesh
    out["all_rows"] = sorted(set(re.findall(r"[a-z0-9]+\[8,256,[0-9,]+\]", compiled.as_text())))

    teacher = init_params(t_cfg, jax.random.key(0))
    student = c.student_params(s_cfg, teacher, init_params(s_cfg.replace(param_dtype="float32"), jax.random.key(1)))
    train, _ = split_trainable(student, trainable_mask(student, s_cfg, "stage1"))
    tokens = np.random.default_rng(0).integers(0, t_cfg.vocab_size, (8, 32)).astype(np.int32)
    opt = optax.sgd(1.0)   # new weights = old - gradient
    for name, mesh, gather in [("1", parallel.make_mesh(devices=jax.devices()[:1]), False),
                               ("2x4", parallel.make_mesh(2, 4), True)]:
        step = c.build_step(t_cfg, s_cfg, opt, mesh, loss_chunk=16, gather=gather)
        tr = jax.device_put(train, parallel.param_shardings(train, mesh, min_size=0))
        args = (tr, opt.init(tr), jax.device_put(teacher, parallel.param_shardings(teacher, mesh, min_size=0)),
                jax.device_put(tokens, parallel.batch_sharding(mesh)))
        new, _, loss = jax.jit(step)(*args)
        out[name] = {"loss": float(loss),
                     "grad": (np.asarray(train["layers"][0]["mixer"]["in_proj"]["kernel"])
                              - np.asarray(new["layers"][0]["mixer"]["in_proj"]["kernel"])).ravel()[:4096].tolist()}
    print("RESULT" + json.dumps(out))
""")


def test_fsdp_gather_shrinks_activations_and_keeps_values():
    # Rows are split over data x fsdp. Left alone, XLA's partitioner kept the fsdp-split (d_model) weights split
    # and gathered every row of the batch onto each device instead, so per-device temporaries GREW with fsdp
    # (6x at fsdp 8 here). parallel.fsdp_gather all-gathers each layer's weights where it runs: per-device
    # activations stay one row's, whatever the fsdp size, and the step's values do not change.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _FSDP_STEP], env=env, capture_output=True, text=True,
                          timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["all_rows"] == [], out["all_rows"]
    temps = out["temporaries"]   # one row's activations everywhere (the order of a few buffers may differ)
    assert temps["2x4"] <= 1.25 * temps["8x1"] and temps["1x8"] <= 1.25 * temps["8x1"], temps
    np.testing.assert_allclose(out["2x4"]["loss"], out["1"]["loss"], rtol=2e-6)
    # bf16 backward: the gradient's sums over rows run in another order across devices (bf16-level differences)
    g, ref = np.asarray(out["2x4"]["grad"]), np.asarray(out["1"]["grad"])
    assert np.max(np.abs(g - ref)) <= 2e-2 * np.max(np.abs(ref))
