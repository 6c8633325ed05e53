"""Mamba-2's chunked SSD scan, forward and forward+backward, per backend, with mamba_ssm's Triton kernels beside.

    python -m experiments.bench_ssd [--quick] [--json FILE] [--mamba-ssm-path DIR] [--reps 20]

Shapes (one Mamba-2 layer of an 8B student): H=32 heads, P=128, N=128, G=32 groups, chunk Q=256, bf16 x/B/C,
fp32 dt (already softplus-ed), fp32 A and D, no h0; B×L in 1×2048, 8×2048, 1×8192, 4×8192, 1×32768.
Backends: "xla" (ops.ssm.ssd_chunked) and "pallas" (kernels/pallas_ssd.py: fused forward and backward), through
kernels.dispatch.ssd, and "pallas-xla-bwd" (the fused forward with the XLA reference's VJP as its backward, the
old path); plus mamba_ssm's `mamba_chunk_scan_combined` (torch, same
process, same input values) when it imports: --mamba-ssm-path DIR is put first on sys.path for that.

At each shape, before timing, pallas (and mamba_ssm) are checked against xla: relative errors
‖out − ref‖ / ‖ref‖ of y and of the final state, and for the JAX backends the largest relative error of the
gradients of x, dt, A, B, C and D (rel_grad). Times: the median of --reps calls after warm-up, each
ended by block_until_ready (torch: torch.cuda.synchronize). "fwd+bwd" computes y and the final state and
the gradients of every input (x, dt, A, B, C, D) for fixed random cotangents of both outputs.
--quick: tiny shapes on the CPU, pallas in interpret mode (a smoke test; the times mean nothing).
Prints a markdown table last; --json FILE writes every row.
"""

from __future__ import annotations

import os

# torch shares the GPU in this process: JAX must not take 75% of its memory up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(heads=32, head_dim=128, dstate=128, groups=32, chunk=256, sizes=[(1, 2048), (8, 2048), (1, 8192),
                                                                           (4, 8192), (1, 32768)])
QUICK = dict(heads=4, head_dim=16, dstate=16, groups=2, chunk=32, sizes=[(1, 64), (2, 80)])
OK_REL = 2e-2  # bf16 inputs: y is rounded to bf16 and the kernels' dot operands are bf16
GRAD_OVER_OUT = 2.5  # gradients may be off by 2.5x that (the backward rounds more operands to bf16)


def _load_dispatch():
    """kernels.dispatch; where `import l2m_jax` fails (a dependency of the wider package is missing), the
    package folder is registered without running its __init__, which is all the kernels and ops.ssm need."""
    try:
        importlib.import_module("l2m_jax")
    except Exception as e:  # noqa: BLE001 - any import problem of the wider package
        print(f"(import l2m_jax failed: {e!r}; loading l2m_jax.ops and l2m_jax.kernels without it)")
        package = types.ModuleType("l2m_jax")
        package.__path__ = [str(ROOT / "l2m_jax")]
        sys.modules["l2m_jax"] = package
    return importlib.import_module("l2m_jax.kernels.dispatch")


def _problem(seed, batch, length, heads, head_dim, dstate, groups):
    """Numpy arrays (fp32; x, B, C hold bf16-representable values): well-scaled, never zeros."""
    rng = np.random.default_rng(seed)

    def bf16(*shape, scale=1.0):
        values = rng.standard_normal(shape, np.float32) * np.float32(scale)
        return np.asarray(jnp.asarray(values, jnp.bfloat16), np.float32)

    return dict(
        x=bf16(batch, length, heads, head_dim),
        dt=rng.uniform(0.001, 0.1, (batch, length, heads)).astype(np.float32),  # softplus-ed, as in trained layers
        A=-rng.uniform(1.0, 16.0, heads).astype(np.float32),
        B=bf16(batch, length, groups, dstate, scale=dstate**-0.5),
        C=bf16(batch, length, groups, dstate, scale=dstate**-0.5),
        D=rng.standard_normal(heads).astype(np.float32),
        y_ct=rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32),
        h_ct=rng.standard_normal((batch, heads, head_dim, dstate)).astype(np.float32),
    )


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _median_s(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------- JAX


def _jax_fns(dispatch, backend, chunk, interpret):
    def op(x, dt, A, B, C, D):
        if backend == "pallas-xla-bwd":
            from l2m_jax.kernels.pallas_ssd import ssd_chunked_pallas

            return ssd_chunked_pallas(x, dt, A, B, C, D, chunk=chunk, interpret=interpret, backward="xla")
        return dispatch.ssd(x, dt, A, B, C, D, chunk=chunk, backend=backend, interpret=interpret)

    def fwd_bwd(x, dt, A, B, C, D, y_ct, h_ct):
        out, vjp = jax.vjp(op, x, dt, A, B, C, D)
        return out, vjp((y_ct.astype(out[0].dtype), h_ct))

    return jax.jit(op), jax.jit(fwd_bwd)


def _jax_args(p):
    bf = jnp.bfloat16
    return (jnp.asarray(p["x"], bf), jnp.asarray(p["dt"]), jnp.asarray(p["A"]), jnp.asarray(p["B"], bf),
            jnp.asarray(p["C"], bf), jnp.asarray(p["D"]))


# ----------------------------------------------------------------------------------------------- torch


def _load_mamba_ssm(path: str):
    """(torch, mamba_chunk_scan_combined) or (None, why not)."""
    if path:
        sys.path.insert(0, str(Path(path).resolve()))
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "torch sees no CUDA GPU"
        importlib.import_module("mamba_ssm")
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001 - report and run without it
        return None, f"{type(e).__name__}: {str(e)[:300]}"
    return (torch, mamba_chunk_scan_combined), None


def _torch_fns(mamba, p, chunk):
    torch, scan = mamba
    dev = "cuda"
    bf = torch.bfloat16
    t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in p.items()}
    inputs = dict(x=t["x"].to(bf), dt=t["dt"], A=t["A"], B=t["B"].to(bf), C=t["C"].to(bf), D=t["D"])
    y_ct = t["y_ct"].to(bf)

    def fwd():
        with torch.no_grad():
            out = scan(*(inputs[k] for k in ("x", "dt", "A", "B", "C")), chunk, D=inputs["D"],
                       return_final_states=True)
        torch.cuda.synchronize()
        return out

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}

    def fwd_bwd():
        for v in leaves.values():
            v.grad = None
        y, h = scan(*(leaves[k] for k in ("x", "dt", "A", "B", "C")), chunk, D=leaves["D"], return_final_states=True)
        torch.autograd.backward([y, h], [y_ct, t["h_ct"]])
        torch.cuda.synchronize()
        return y, h

    def to_np(a):
        return a.detach().float().cpu().numpy()

    return fwd, fwd_bwd, to_np


# ----------------------------------------------------------------------------------------------- main


def run(args):
    dispatch = _load_dispatch()
    cfg = QUICK if args.quick else FULL
    dims = {k: cfg[k] for k in ("heads", "head_dim", "dstate", "groups")}
    chunk = cfg["chunk"]
    backends = [b for b in args.backends.split(",") if b]
    mamba, why = (None, "--quick runs on the CPU") if args.quick else _load_mamba_ssm(args.mamba_ssm_path)
    print(f"jax {jax.__version__}, devices {jax.devices()}; mamba_ssm: {'yes' if mamba else 'no (' + why + ')'}")
    fns = {b: _jax_fns(dispatch, b, chunk, interpret=args.quick and b.startswith("pallas")) for b in backends}
    rows, ok = [], True
    t0 = time.perf_counter()

    def say(msg):                               # progress: compiling (and mamba_ssm's autotuning) takes minutes
        print(f"  [{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)
    sizes = cfg["sizes"]
    if args.sizes:
        sizes = [tuple(int(n) for n in s.split("x")) for s in args.sizes.split(",")]
    for batch, length in sizes:
        p = _problem(0, batch, length, **dims)
        jargs = _jax_args(p)
        cts = (jnp.asarray(p["y_ct"]), jnp.asarray(p["h_ct"]))
        timed = {b: (lambda f=f: jax.block_until_ready(f(*jargs)), lambda g=g: jax.block_until_ready(g(*jargs, *cts)))
                 for b, (f, g) in fns.items()}
        if mamba is not None:
            try:
                fwd, fwd_bwd, to_np = _torch_fns(mamba, p, chunk)
                timed["mamba_ssm"] = (fwd, fwd_bwd)
            except Exception as e:  # noqa: BLE001 - report and run without it
                print(f"  mamba_ssm {batch}x{length}: setup failed: {type(e).__name__}: {str(e)[:800]}")
        # 1. the check, before any timing: every backend's forward against xla's
        shape_rows, outs = {}, {}
        for backend, (fwd, _) in timed.items():
            row = shape_rows[backend] = dict(batch=batch, length=length, backend=backend)
            try:
                out = fwd()
                outs[backend] = [to_np(a) if backend == "mamba_ssm" else np.asarray(a, np.float32) for a in out]
            except Exception as e:  # noqa: BLE001 - report and carry on with the other backends
                row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
                ok &= backend == "mamba_ssm"
            say(f"{batch}x{length} {backend}: forward {'failed' if 'error' in row else 'ran'}")
        grads = {}
        for backend in fns:                         # the gradients of every input, JAX backends
            if backend in outs:
                try:
                    grads[backend] = [np.asarray(g, np.float32) for g in fns[backend][1](*jargs, *cts)[1]]
                except Exception as e:  # noqa: BLE001
                    shape_rows[backend]["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
                    ok = False
                say(f"{batch}x{length} {backend}: gradients {'failed' if backend not in grads else 'ran'}")
        for backend, row in shape_rows.items():
            if backend == "xla" or "xla" not in outs or backend not in outs:
                continue
            row["rel_y"] = _rel(outs[backend][0], outs["xla"][0])
            row["rel_h"] = _rel(outs[backend][1], outs["xla"][1])
            worst = max(row["rel_y"], row["rel_h"])
            if backend in grads and "xla" in grads:
                row["rel_grad"] = max(_rel(g, w) for g, w in zip(grads[backend], grads["xla"]))
                worst = max(worst, row["rel_grad"] / GRAD_OVER_OUT)
            row["check"] = "ok" if worst < OK_REL else "FAIL"
            ok &= row["check"] == "ok" or backend == "mamba_ssm"  # mamba_ssm's numbers are shown, not judged
        # 2. the timings
        for backend, (fwd, fwd_bwd) in timed.items():
            row = shape_rows[backend]
            if "error" in row:
                continue
            try:
                row["fwd_ms"] = 1e3 * _median_s(fwd, args.warmup, args.reps)
                row["fwd_bwd_ms"] = 1e3 * _median_s(fwd_bwd, args.warmup, args.reps)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
                ok &= backend == "mamba_ssm"
            say(f"{batch}x{length} {backend}: timed")
        for row in shape_rows.values():
            rows.append(row)
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
        if args.json:                           # every finished shape is on disk if a later one is stopped
            _write_json(args.json, rows)
    return rows, ok


def _write_json(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
                                     indent=1))


def table(rows) -> str:
    xla = {(r["batch"], r["length"]): r for r in rows if r["backend"] == "xla" and "fwd_ms" in r}
    lines = ["| B×L | backend | fwd ms | fwd+bwd ms | fwd ×xla | fwd+bwd ×xla | rel err y | rel err h | rel err grads |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['batch']}×{r['length']}"
        if "error" in r:
            lines.append(f"| {shape} | {r['backend']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        base = xla.get((r["batch"], r["length"]))
        speed = [f"{base[k] / r[k]:.2f}" if base else "-" for k in ("fwd_ms", "fwd_bwd_ms")]
        errs = [f"{r[k]:.1e}" if k in r else "-" for k in ("rel_y", "rel_h", "rel_grad")]
        lines.append(f"| {shape} | {r['backend']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                     + " | ".join(speed + errs) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, pallas in interpret mode")
    ap.add_argument("--json", default="", help="write every row to this file")
    ap.add_argument("--mamba-ssm-path", default="", help="a folder holding the mamba_ssm package (put on sys.path)")
    ap.add_argument("--backends", default="xla,pallas", help="comma-separated JAX backends (xla first: the check)")
    ap.add_argument("--sizes", default="", help="B×L shapes to run instead, e.g. 1x2048,8x2048")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    if args.quick:
        jax.config.update("jax_platforms", "cpu")
        args.reps, args.warmup = min(args.reps, 3), 1
    rows, ok = run(args)
    device = jax.devices()[0].device_kind                 # run() wrote --json after every shape
    print(f"\n## SSD forward and forward+backward ({device}; checks {'passed' if ok else 'FAILED'})\n")
    print(table(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
