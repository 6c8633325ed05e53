"""Attention decode against a KV cache, per layer: the fused Pallas kernel vs the XLA paths, and the HBM floor.

    python -m experiments.bench_attn_decode [--quick] [--reps 20] [--paths pallas,blocked,full] [--out DIR]
        [--contexts 1024,8192,32768] [--batches 1,8,32]

Paths (l2m_jax.ops.attention.set_decode_attention): "pallas" (kernels/pallas_attention.py: one launch, split-K
over the filled KV blocks), "blocked" (gqa_attention_cached: an XLA while loop over the filled blocks), "full"
(gqa_attention over every preallocated slot, masked; what decoding uses by default). "pallas:BLOCKxSPLITS"
(e.g. pallas:128x1; SPLITS 0 = the kernel's own choice) times the kernel with those tiles instead of its own.
Shapes (Llama-3-8B attention layer): H = 32 query heads, G = 8 KV heads, P = 128, bf16 cache, T = 1 (a decode
step) and T = 5 (a K = 4 verification) queries, batch 1 / 8 / 32, filled context 1k / 8k / 32k tokens in a cache
of context + 256 slots, and a 1k context in a 32k cache (a long-context server's preallocation).
1. Checks: every path against the full-cache reference on the device, relative error of the output.
2. Timing: one jitted call runs the op over L layers (distinct caches, enough that they do not sit in L2),
   median of --reps after warm-up, divided by L. Floor: the filled KV bytes (K and V of `context` slots) at
   4.19 TB/s; a path that reads the whole cache moves capacity / context times that.
Prints a markdown table; writes results.json to --out (default $OUT when set).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_decode import median_time
from l2m_jax.kernels import pallas_attention
from l2m_jax.ops import attention as attn_ops

HBM = 4.19e12
PATHS = ("pallas", "blocked", "full")


def _problem(key, batch, tokens, context, capacity, heads, groups, head_dim, layers):
    ks = jax.random.split(key, 3)
    q = jax.random.normal(ks[0], (batch, tokens, heads, head_dim), jnp.bfloat16)
    shape = (layers, batch, capacity, groups, head_dim)
    k = jax.random.normal(ks[1], shape, jnp.bfloat16)
    v = jax.random.normal(ks[2], shape, jnp.bfloat16)
    # the T new tokens sit at positions context - T .. context - 1; rows are all filled to `context`
    pos = jnp.broadcast_to(jnp.arange(context - tokens, context, dtype=jnp.int32), (batch, tokens))
    return q, k, v, pos, jnp.full((batch,), context, jnp.int32)


def _full(q, k, v, pos, lengths):
    b, s = k.shape[:2]
    slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return attn_ops.gqa_attention(q, k, v, attn_ops.attention_mask(pos, slots, slots < lengths[:, None]))


def tiles(path: str) -> tuple[int, int | None] | None:
    """(block, splits or None) of a "pallas:BLOCKxSPLITS" path, None for the named paths; ValueError if bad."""
    if not path.startswith("pallas:"):
        if path not in PATHS:
            raise ValueError(path)
        return None
    try:
        block, splits = (int(n) for n in path.split(":", 1)[1].split("x"))
    except ValueError:
        raise ValueError(path) from None
    pallas_attention.check_decode_tiling(128, 1 << 20, block)       # a block the kernel takes
    if splits < 0:
        raise ValueError(path)
    return block, splits or None


def compiled(path, interpret, args):
    """`path` over the stacked layers' caches, lowered and compiled while its decode setting is in force."""
    tiled = tiles(path)
    if tiled is not None:                                  # the kernel itself with given tiles: no switch to set
        op, switch = functools.partial(pallas_attention.decode_attention, block=tiled[0], splits=tiled[1],
                                       interpret=interpret), None
    elif path == "full":
        op, switch = _full, None
    else:
        op, switch = attn_ops.cached_decode_attention, path

    def run(q, ks, vs, pos, lengths):
        return [op(q, ks[i], vs[i], pos, lengths) for i in range(ks.shape[0])]

    if switch is not None:
        attn_ops.set_decode_attention(switch, interpret=interpret)
    try:
        return jax.jit(run).lower(*args).compile()
    finally:
        attn_ops.set_decode_attention("full", interpret=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, Pallas in interpret mode: a CPU smoke run")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop starting new rows after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--contexts", default="1024,8192,32768", help="filled context lengths (full shapes)")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes (full shapes)")
    a = ap.parse_args(argv)
    paths = a.paths.split(",")
    bad = []
    for p in paths:
        try:
            tiles(p)
        except ValueError:
            bad.append(p)
    if bad:
        ap.error(f"--paths takes {', '.join(PATHS)} or pallas:BLOCKxSPLITS (block a power of two in [16, 128], "
                 f"splits >= 0); got {', '.join(bad)}")
    gpu = jax.default_backend() == "gpu"
    interpret = not gpu
    if any(p.startswith("pallas") for p in paths) and not gpu and not a.quick:
        ap.error("the pallas path needs a GPU; on a CPU pass --quick (interpret mode, tiny shapes)")
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
    if a.quick:
        heads, groups, head_dim = 4, 2, 16
        cases = [(1, 1, 40, 64), (2, 5, 100, 128)]
    else:
        heads, groups, head_dim = 32, 8, 128
        contexts, batches = (tuple(int(n) for n in x.split(",")) for x in (a.contexts, a.batches))
        cases = [(b, t, c, c + 256) for c in contexts for b in batches for t in (1, 5)]
        cases += [(b, 1, 1024, 32768) for b in batches if b <= 8 and 1024 in contexts]
    rows, start, ok = [], time.time(), True
    for batch, tokens, context, capacity in cases:
        if time.time() - start > a.budget_s:
            print(f"(budget spent: skipping B={batch} T={tokens} context={context})", flush=True)
            continue
        per_layer = 2 * batch * capacity * groups * head_dim * 2
        layers = 1 if a.quick else int(max(1, min(16, (8 << 30) // per_layer)))
        args = _problem(jax.random.key(batch * 7 + tokens), batch, tokens, context, capacity, heads, groups,
                        head_dim, layers)
        floor = 2 * batch * context * groups * head_dim * 2           # the filled K and V, bf16
        row = dict(batch=batch, tokens=tokens, context=context, capacity=capacity, layers=layers,
                   floor_us=floor / HBM * 1e6)
        want = None
        for path in ["full"] + [p for p in paths if p != "full"]:
            try:
                fn = compiled(path, interpret, args)
                out = fn(*args)
                if want is None:
                    want = np.asarray(out[0], np.float32)
                got = np.asarray(out[0], np.float32)
                err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                row[f"{path}_err"] = err
                ok &= err < 2e-2
                if path in paths:
                    row[f"{path}_us"] = median_time(lambda: fn(*args), a.reps, warmup=2) / layers * 1e6
            except Exception as e:  # noqa: BLE001 - report and carry on with the other paths
                row[f"{path}_error"] = f"{type(e).__name__}: {str(e)[:600]}"
                print(f"  B={batch} T={tokens} ctx={context} {path}: FAILED {row[f'{path}_error']}", flush=True)
                ok = False
        rows.append(row)
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    head = "| B | T | context | capacity | floor µs | " + " | ".join(f"{p} µs (TB/s of the filled KV)" for p in paths)
    lines = [head + " | pallas / full |" if {"pallas", "full"} <= set(paths) else head + " |"]
    lines.append("|" + "---|" * (lines[0].count("|") - 1))
    for r in rows:
        cells = []
        for p in paths:
            us = r.get(f"{p}_us")
            floor_bytes = r["floor_us"] * 1e-6 * HBM
            cells.append(f"{us:.1f} ({floor_bytes / (us * 1e-6) / 1e12:.2f})" if us else "-")
        ratio = ""
        if {"pallas", "full"} <= set(paths):
            ratio = f" {r['pallas_us'] / r['full_us']:.2f} |" if r.get("pallas_us") and r.get("full_us") else " - |"
        lines.append(f"| {r['batch']} | {r['tokens']} | {r['context']} | {r['capacity']} | {r['floor_us']:.1f} | "
                     + " | ".join(cells) + " |" + ratio)
    print(f"\n## Attention decode per layer ({jax.devices()[0].device_kind}; checks {'passed' if ok else 'FAILED'})\n")
    print("\n".join(lines))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "attn_decode.json").write_text(json.dumps(rows, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
