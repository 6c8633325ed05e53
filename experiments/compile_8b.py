"""Compile (never run) the Llama-3-8B-shape stage-1 distillation step, on 1 device and sharded 8 ways.

    JAX_NUM_CPU_DEVICES=8 python -m experiments.compile_8b [--data 2 --fsdp 4] [--seq 2048]

Parameters are abstract (jax.ShapeDtypeStruct with their shardings), so nothing of 8B size is allocated.
Prints XLA's memory analysis of each compiled step: arguments, outputs, temporaries, per device. On CPU
these are the CPU backend's numbers (same program, different fusion and scheduling than on a GPU).
Stage 1: bf16 frozen teacher; 50% Mamba2 student sharing the teacher's frozen leaves; fp32 trainable
mixers with AdamW moments; α·CE + β·KL; every layer rematerialised.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")  # before jax is imported: fake devices on a CPU machine

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from l2m_jax.config import ModelConfig, default_ssm_config  # noqa: E402
from l2m_jax.convert.hybridize import attention_layers_for  # noqa: E402
from l2m_jax.models import abstract_params, bind  # noqa: E402
from l2m_jax.parallel import batch_sharding, make_mesh, param_shardings  # noqa: E402
from l2m_jax.train.losses import shift_for_next_token, stage1_loss  # noqa: E402
from l2m_jax.train.optim import make_optimizer, merge, split_trainable, trainable_mask  # noqa: E402


def configs(name: str):
    t = ModelConfig.llama3_8b() if name == "8b" else ModelConfig.tiny(dtype="bfloat16", param_dtype="bfloat16")
    keep = attention_layers_for(t.n_layers, 0.5)
    s = t.replace(layer_mixers=tuple("attention" if i in keep else "mamba2" for i in range(t.n_layers)),
                  ssm=default_ssm_config(t, "mamba2"))
    return t, s


def abstract_student(t_cfg, s_cfg):
    t_abs = abstract_params(t_cfg)
    mixers = abstract_params(s_cfg.replace(param_dtype="float32"))["layers"]
    layers = {i: (dict(t_abs["layers"][i], mixer=mixers[i]["mixer"]) if m != "attention" else t_abs["layers"][i])
              for i, m in enumerate(s_cfg.layer_mixers)}
    return t_abs, dict(t_abs, layers=layers)


def build_step(t_cfg, s_cfg, opt, mesh):
    rows = batch_sharding(mesh)  # keep [B, L, V] logits split by rows: they are the largest activations

    def loss_fn(train, frozen, teacher, tokens):
        t_logits = jax.lax.stop_gradient(bind(t_cfg, teacher)(tokens, remat=True)[0])
        s_logits = bind(s_cfg, merge(train, frozen))(tokens, remat=True)[0]
        t_logits = jax.lax.with_sharding_constraint(t_logits, rows)
        s_logits = jax.lax.with_sharding_constraint(s_logits, rows)
        targets, mask = shift_for_next_token(tokens)
        return stage1_loss(s_logits, t_logits, targets, mask)

    def step(train, opt_state, frozen, teacher, tokens):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(train, frozen, teacher, tokens)
        upd, opt_state = opt.update(g, opt_state, train)
        return jax.tree.map(lambda p, u: p + u, train, upd), opt_state, loss
    return step


def with_sharding(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def compile_once(t_cfg, s_cfg, mesh, batch, seq):
    t_abs, s_abs = abstract_student(t_cfg, s_cfg)
    mask = trainable_mask(s_abs, s_cfg, "stage1")
    train, frozen = split_trainable(s_abs, mask)
    opt = make_optimizer(lr=8e-5, betas=(0.9, 0.98), clip_norm=0.1, warmup_steps=500, total_steps=10000)
    opt_abs = jax.eval_shape(opt.init, train)
    sh = lambda tree: param_shardings(tree, mesh)  # noqa: E731
    args = (with_sharding(train, sh(train)), with_sharding(opt_abs, sh(opt_abs)),
            with_sharding(frozen, sh(frozen)), with_sharding(t_abs, sh(t_abs)),
            jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sharding(mesh)))
    step = build_step(t_cfg, s_cfg, opt, mesh)
    t0 = time.time()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    m = compiled.memory_analysis()
    gb = lambda x: x / 1e9  # noqa: E731
    n_train = sum(x.size for x in jax.tree.leaves(train))
    print(f"mesh {dict(mesh.shape)}: compiled in {time.time() - t0:.0f} s; trainable params {n_train / 1e9:.2f} B; "
          f"per device: arguments {gb(m.argument_size_in_bytes):.1f} GB, outputs {gb(m.output_size_in_bytes):.1f} GB, "
          f"temporaries {gb(m.temp_size_in_bytes):.1f} GB, aliased {gb(m.alias_size_in_bytes):.1f} GB -> peak estimate "
          f"{gb(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes):.1f} GB",
          flush=True)
    return m


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8b", choices=["8b", "tiny"])
    ap.add_argument("--data", type=int, default=2)
    ap.add_argument("--fsdp", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--single", action="store_true", help="also compile the unsharded 1-device step")
    a = ap.parse_args(argv)
    t_cfg, s_cfg = configs(a.shapes)
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices; student pattern {s_cfg.pattern}", flush=True)
    if a.single:
        compile_once(t_cfg, s_cfg, make_mesh(data=1, fsdp=1, devices=jax.devices()[:1]), 1, a.seq)
    n = a.data * a.fsdp
    if jax.device_count() < n:
        raise SystemExit(f"need {n} devices; run with JAX_NUM_CPU_DEVICES={n} (set before jax is imported)")
    compile_once(t_cfg, s_cfg, make_mesh(data=a.data, fsdp=a.fsdp, devices=jax.devices()[:n]), a.data * a.fsdp,
                 a.seq)


if __name__ == "__main__":
    main()
