"""Compile (never run) the Llama-3-8B-shape stage-1 distillation step on a sweep of meshes.

    JAX_NUM_CPU_DEVICES=8 python -m experiments.compile_8b [--meshes 1,8x1,4x2,2x4,1x8] [--layers N] [--json]

Parameters are abstract (jax.ShapeDtypeStruct with their shardings), so nothing of 8B size is allocated.
Every mesh gets the same `--rows` rows of `--seq` tokens per device (rows are split over data × fsdp), so
what changes along the sweep is only how the parameters are split. Prints XLA's memory analysis of each
compiled step, per device: arguments, outputs, temporaries, the peak estimate, and the compile time. On CPU
these are the CPU backend's numbers (same program, different fusion and scheduling than on a GPU; the CPU
backend also runs bf16 matmuls in fp32, on fp32 copies of the bf16 weights that it keeps from a layer's forward
to its backward, about 1 GB per 8B layer, which a GPU does not). Its memory-minimising scheduler is chosen
unless XLA_FLAGS names `xla_cpu_enable_concurrency_optimized_scheduler`.
Stage 1: bf16 frozen teacher; 50% Mamba2 student made of the teacher's frozen leaves (passed once) and fp32
trainable mixers with AdamW moments; α·CE + β·KL from hidden states in chunks of `--loss-chunk` positions
(`chunked.stage1_loss_chunked`: no [B, L, V] logits); every layer rematerialised, and on an fsdp mesh each
layer all-gathers its own weights where it runs (`parallel.fsdp_gather`). `--loss-chunk 0` and `--no-gather`
compile the step without those two, for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")  # before jax is imported: fake devices on a CPU machine
# The CPU backend's default scheduler orders for thread concurrency: it runs every layer's rematerialised forward
# ahead of the backward pass (on CPU the remat's optimization barriers are gone by then), which a GPU does not.
# The memory-minimising scheduler keeps remat's order, so the numbers estimate a GPU's better.
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler"
                               "=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from l2m_jax.config import ModelConfig, default_ssm_config  # noqa: E402
from l2m_jax.convert.hybridize import attention_layers_for  # noqa: E402
from l2m_jax.models import abstract_params, bind  # noqa: E402
from l2m_jax.parallel import batch_sharding, fsdp_gather, make_mesh, param_shardings  # noqa: E402
from l2m_jax.train.chunked import hidden_and_head, stage1_loss_chunked  # noqa: E402
from l2m_jax.train.losses import shift_for_next_token, stage1_loss  # noqa: E402
from l2m_jax.train.optim import make_optimizer, split_trainable, trainable_mask  # noqa: E402

MESHES = "1,8x1,4x2,2x4,1x8"


def configs(name: str, n_layers: int | None = None):
    kw = {} if n_layers is None else {"n_layers": n_layers}
    t = (ModelConfig.llama3_8b(**kw) if name == "8b"
         else ModelConfig.tiny(dtype="bfloat16", param_dtype="bfloat16", **kw))
    keep = attention_layers_for(t.n_layers, 0.5)
    s = t.replace(layer_mixers=tuple("attention" if i in keep else "mamba2" for i in range(t.n_layers)),
                  ssm=default_ssm_config(t, "mamba2"))
    return t, s


def student_params(s_cfg, teacher, mixers):
    """The student's tree: the teacher's leaves, with `mixers` (the trainable tree) in its Mamba layers."""
    layers = {i: (dict(teacher["layers"][i], mixer=mixers["layers"][i]["mixer"]) if m != "attention"
                  else teacher["layers"][i]) for i, m in enumerate(s_cfg.layer_mixers)}
    return dict(teacher, layers=layers)


def abstract_args(t_cfg, s_cfg):
    """(trainable fp32 mixers, teacher) as ShapeDtypeStructs; the student's frozen leaves are the teacher's."""
    t_abs = abstract_params(t_cfg)
    s_abs = student_params(s_cfg, t_abs, abstract_params(s_cfg.replace(param_dtype="float32")))
    train, _ = split_trainable(s_abs, trainable_mask(s_abs, s_cfg, "stage1"))
    return train, t_abs


def build_step(t_cfg, s_cfg, opt, mesh, *, loss_chunk: int, gather: bool):
    g = fsdp_gather(mesh) if gather else None

    def loss_fn(train, teacher, tokens):
        student = student_params(s_cfg, teacher, train)
        targets, mask = shift_for_next_token(tokens)
        if loss_chunk:
            t_hidden, t_head = jax.lax.stop_gradient(hidden_and_head(t_cfg, teacher, tokens, remat=True, gather=g))
            s_hidden, s_head = hidden_and_head(s_cfg, student, tokens, remat=True, gather=g)
            return stage1_loss_chunked(s_hidden, t_hidden, s_head, t_head, targets, mask, chunk=loss_chunk)
        t_logits = jax.lax.stop_gradient(bind(t_cfg, teacher)(tokens, remat=True, gather=g)[0])   # [B, L, V]
        s_logits = bind(s_cfg, student)(tokens, remat=True, gather=g)[0]                           # [B, L, V]
        return stage1_loss(s_logits, t_logits, targets, mask)

    def step(train, opt_state, teacher, tokens):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(train, teacher, tokens)
        upd, opt_state = opt.update(grads, opt_state, train)
        return jax.tree.map(lambda p, u: p + u, train, upd), opt_state, loss
    return step


def with_sharding(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def compile_step(t_cfg, s_cfg, mesh, batch: int, seq: int, *, loss_chunk: int = 512, gather: bool = True):
    """The compiled step on `mesh` for `batch` rows of `seq` tokens, and its compile time in seconds."""
    train, t_abs = abstract_args(t_cfg, s_cfg)
    opt = make_optimizer(lr=8e-5, betas=(0.9, 0.98), clip_norm=0.1, warmup_steps=500, total_steps=10000)
    opt_abs = jax.eval_shape(opt.init, train)
    sh = lambda tree: param_shardings(tree, mesh)  # noqa: E731
    args = (with_sharding(train, sh(train)), with_sharding(opt_abs, sh(opt_abs)), with_sharding(t_abs, sh(t_abs)),
            jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sharding(mesh)))
    step = build_step(t_cfg, s_cfg, opt, mesh, loss_chunk=loss_chunk, gather=gather)
    t0 = time.time()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    return compiled, time.time() - t0


def memory_row(compiled, mesh, batch: int, seconds: float) -> dict:
    """Per-device memory analysis of a compiled step, in bytes (the peak estimate: arguments + outputs +
    temporaries − what the outputs alias of the donated arguments)."""
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"data": mesh.shape["data"], "fsdp": mesh.shape["fsdp"], "devices": mesh.size, "rows": batch,
            "compile_s": round(seconds, 1), "arguments": m.argument_size_in_bytes,
            "outputs": m.output_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "peak": peak}


def parse_meshes(text: str) -> list[tuple[int, int]]:
    """'1,8x1,2x4' -> [(1, 1), (8, 1), (2, 4)]: data × fsdp; a bare n is data n × fsdp 1."""
    out = []
    for part in text.split(","):
        try:
            d, _, f = part.strip().partition("x")
            out.append((int(d), int(f or 1)))
        except ValueError:
            raise SystemExit(f"--meshes: {part!r} is not DATAxFSDP (e.g. 2x4) or a device count") from None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8b", choices=["8b", "tiny"])
    ap.add_argument("--layers", type=int, default=None, help="reduced depth for a quick run (default: all)")
    ap.add_argument("--meshes", default=MESHES, help=f"data×fsdp meshes to compile (default {MESHES})")
    ap.add_argument("--rows", type=int, default=1, help="rows per device")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--loss-chunk", type=int, default=512, help="positions per loss chunk; 0: whole logits")
    ap.add_argument("--no-gather", action="store_true", help="leave the fsdp all-gathers to XLA's partitioner")
    ap.add_argument("--json", action="store_true", help="one JSON object per mesh instead of the table")
    a = ap.parse_args(argv)
    t_cfg, s_cfg = configs(a.shapes, a.layers)
    meshes = parse_meshes(a.meshes)
    need = max(d * f for d, f in meshes)
    if jax.device_count() < need:
        raise SystemExit(f"need {need} devices; run with JAX_NUM_CPU_DEVICES={need} (set before jax is imported)")
    if not a.json:
        print(f"{jax.device_count()} {jax.devices()[0].platform} devices; {s_cfg.n_layers} layers, student "
              f"pattern {s_cfg.pattern}; {a.rows} × {a.seq} tokens per device; loss chunk {a.loss_chunk or 'none'}; "
              f"per-layer fsdp gather {'off' if a.no_gather else 'on'}", flush=True)
        print("| mesh | rows | compile | arguments | outputs | temporaries | peak estimate per device |\n"
              "|---|---|---|---|---|---|---|", flush=True)
    for d, f in meshes:
        mesh = make_mesh(data=d, fsdp=f, devices=jax.devices()[:d * f])
        batch = a.rows * d * f
        compiled, secs = compile_step(t_cfg, s_cfg, mesh, batch, a.seq, loss_chunk=a.loss_chunk,
                                      gather=not a.no_gather)
        row = memory_row(compiled, mesh, batch, secs)
        if a.json:
            print(json.dumps(dict(row, layers=s_cfg.n_layers, seq=a.seq, loss_chunk=a.loss_chunk,
                                  gather=not a.no_gather)), flush=True)
        else:
            gb = lambda k: f"{row[k] / 1e9:.1f} GB"  # noqa: E731
            name = "1 device" if d * f == 1 else f"data {d} × fsdp {f}"
            print(f"| {name} | {batch} × {a.seq} | {secs:.0f} s | {gb('arguments')} | {gb('outputs')} | "
                  f"{gb('temporaries')} | {gb('peak')} |", flush=True)


if __name__ == "__main__":
    main()
