"""Fused multi-step SSM verification vs a single decode step, per Mamba layer, on every available backend.

    python -m experiments.bench_verify [--quick] [--budget-s 300] [--pallas-forms unrolled,matrix] [--out DIR]

1. Checks: every backend (xla, pallas, triton; whichever run here) against the reference computed in float64
   on the CPU, for both variants, both jobs, fp32 and bf16 inputs, on two fresh random problems; prints
   relative errors ‖out − ref‖ / ‖ref‖.
2. Timing at 8B shapes (Mamba-2: H=32, P=128, N=128, Gx=Gb=8, Gc=32; Mamba-1: C=4096, N=16, Gb=64, Gc=256),
   bf16 inputs and fp32 state, batch 1, 16 and 64: one decode step vs one verification call of K new tokens
   (K = 1..8) that also replays K cached tokens (the most work a call can do). One jitted call runs the op
   on L layers, each with its own state (enough layers that the states do not stay in L2), timed with
   block_until_ready after warm-up; the median over repeats, divided by L, is the time per layer.
   The verification is timed as the models call it: it writes the checkpoint and not the state after its new
   tokens (`final_state=False`), so its state crosses HBM once in and once out, like a step's; --final-state
   also times it writing both (MiL's two states), beside, as verifyK_final_us.
   Bytes: the fewest an op must move (state in once and out once, or twice for --final-state, plus its
   per-token inputs and outputs), against 4.2 TB/s. The wall clock includes launching one kernel per
   layer: where the floor is a microsecond or two (batch 1) the times measure launches, not the kernels.
Prints a markdown table last; writes results.json to --out (default $OUT when set).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HBM_BYTES_PER_S = 4.2e12
SHAPES = {
    "mamba2": dict(heads=32, head_dim=128, dstate=128, groups=(8, 8, 32)),
    "mamba": dict(channels=4096, dstate=16, groups=(64, 256)),
}
OK_ERR = {"float32": 1e-4, "bfloat16": 2e-2}  # y of bf16 inputs is rounded to bf16; states stay fp32


def _load_kernels():
    """l2m_jax.kernels, or the kernels/ folder on its own where the package's other dependencies are missing."""
    try:
        from l2m_jax import kernels

        return kernels
    except Exception as e:  # noqa: BLE001 - any import problem of the wider package
        print(f"(import l2m_jax failed: {e!r}; loading kernels/ directly)")
    folder = Path(__file__).resolve().parents[1] / "kernels"
    spec = importlib.util.spec_from_file_location(
        "l2m_kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["l2m_kernels"] = module
    spec.loader.exec_module(module)
    return module


K = _load_kernels()
inputs = importlib.import_module(K.__name__ + ".inputs")
reference = importlib.import_module(K.__name__ + ".reference")
pallas_ssm = importlib.import_module(K.__name__ + ".pallas_ssm")


def _params(p):
    return dict(A=p["A"], D=p["D"], dt_bias=p["dt_bias"])


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _reference64(p, variant):
    """Step and verification on the CPU from the same (possibly bf16) input values, in float64 when JAX
    allows it here (else float32, said so)."""
    def run(dtype):
        q = {k: np.asarray(v, dtype) for k, v in p.items() if k not in ("cache", "n_replay")}
        q["cache"] = tuple(np.asarray(a, dtype) for a in p["cache"])
        q["n_replay"] = np.asarray(p["n_replay"])
        step = reference.ssm_update_ref(*inputs.step_args(q), variant=variant, **_params(q))
        args = (q["h"], q["cache"], q["n_replay"], q["x"], q["dt"], q["B"], q["C"])
        verify = reference.ssm_verify_ref(*args, variant=variant, **_params(q))
        return [np.asarray(a) for a in step], [np.asarray(a) for a in verify[:3]]

    with jax.default_device(jax.devices("cpu")[0]):
        try:
            with jax.enable_x64(True):
                return run(np.float64)
        except Exception as e:  # noqa: BLE001
            print(f"  (float64 reference unavailable: {e!r}; using float32 on the CPU)")
            return run(np.float32)


PALLAS_FORMS = [f"pallas-{f}" for f in pallas_ssm.FORMS if f != "loop"]  # "pallas" itself is the loop form
kernel_backend = pallas_ssm.backend_form


def check(backends, batch=4, tokens=5):
    print(f"\n## Checks: relative error vs float64 reference (batch {batch}, T={tokens}, replay counts 0..T)")
    rows, ok = [], True
    for variant in SHAPES:
        fns = {}
        for name in backends:
            with kernel_backend(name) as b:
                fns[name] = (jax.jit(lambda *a, b=b, **kw: K.ssm_update(*a, variant=variant, backend=b, **kw)),
                             jax.jit(lambda *a, b=b, **kw: K.ssm_verify(*a, variant=variant, backend=b, **kw)[:3]))
        for dtype in ("float32", "bfloat16"):
            for seed in (1, 2):  # a second fresh problem: stale buffers from the first cannot pass
                p = inputs.random_problem(
                    seed, variant, batch=batch, tokens=tokens, dtype=jnp.dtype(dtype), **SHAPES[variant]
                )
                ref_step, ref_verify = _reference64(p, variant)
                for backend, (step_fn, verify_fn) in fns.items():
                    try:
                        with kernel_backend(backend):           # traced (first call) with its loop setting
                            step = step_fn(*inputs.step_args(p), **_params(p))
                            args = (p["h"], p["cache"], p["n_replay"], p["x"], p["dt"], p["B"], p["C"])
                            verify = verify_fn(*args, **_params(p))
                        errs = [_rel(a, b) for a, b in zip([*step, *verify], [*ref_step, *ref_verify])]
                    except Exception as e:  # noqa: BLE001 - report and carry on with the other backends
                        print(f"  {variant} {dtype} {backend}: FAILED {type(e).__name__}: {str(e)[:1500]}")
                        ok = False
                        continue
                    good = errs[0] < OK_ERR[dtype] and errs[2] < OK_ERR[dtype] and max(errs[1], errs[3], errs[4]) < 1e-4
                    ok &= good
                    rows.append((variant, dtype, seed, backend, *errs, "ok" if good else "FAIL"))
    print("| variant | inputs | seed | backend | step y | step h | verify y | h_ckpt | h_run | |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r[:4])) + " | " + " | ".join(f"{e:.2e}" for e in r[4:9]) + f" | {r[9]} |")
    return ok, rows


def _min_bytes(p, variant, verify, final_state=False):
    """Fewest bytes an op must move: the state in once and out once (step; verify) or twice (verify with its
    final state), every input read once, y written once. p's token arrays hold exactly the op's tokens."""
    y_per_x = p["h"].shape[1] // p["x"].shape[2] if variant == "mamba2" else 1  # y has H heads, x only Gx groups
    tokens = sum(p[k].nbytes for k in ("x", "dt", "B", "C")) + p["x"].nbytes * y_per_x
    state = p["h"].size * 4
    if not verify:
        return 2 * state + tokens
    return (3 if final_state else 2) * state + tokens + sum(a.nbytes for a in p["cache"]) + p["n_replay"].nbytes


def _time(fn, args, reps):
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(backends, batches, ks, budget_s, reps, also_final=False):
    print(f"\n## Timing (µs per layer, median of {reps}; verify replays K cached tokens and runs K new ones)")
    start, results = time.time(), []
    for variant, dims in SHAPES.items():
        for batch in batches:
            p = inputs.random_problem(0, variant, batch=batch, tokens=max(ks), dtype=jnp.bfloat16, **dims)
            state_bytes = p["h"].size * 4
            layers = int(max(4, min(32, (256 << 20) // state_bytes)))
            states = [p["h"] + i for i in range(layers)]  # distinct states, like distinct layers
            for backend in backends:
                row = dict(variant=variant, batch=batch, backend=backend, layers=layers, state_bytes=state_bytes)
                if time.time() - start > budget_s:
                    print(f"  (budget of {budget_s} s spent: skipping {variant} B={batch} {backend})")
                    continue
                try:
                    with kernel_backend(backend) as dispatch_backend:
                        kw = dict(variant=variant, backend=dispatch_backend, **_params(p))
                        # one inner jit per op: its lowering (and its Triton kernel) is shared by every layer
                        op = jax.jit(lambda h, x, dt, B, C: K.ssm_update(h, x, dt, B, C, **kw))
                        step_args = inputs.step_args(p)[1:]
                        run = jax.jit(lambda hs, *a: [op(h, *a) for h in hs])
                        row["step_us"] = _time(run, (states, *step_args), reps) / layers * 1e6
                        one = {n: p[n][:, :1] for n in ("x", "dt", "B", "C")}
                        row["step_bytes"] = _min_bytes({**p, **one}, variant, False)
                        for k in ks:
                            sub = {n: p[n][:, :k] for n in ("x", "dt", "B", "C")}
                            cache = tuple(a[:, :k] for a in p["cache"])
                            n_rep = jnp.full((batch,), k, jnp.int32)
                            args = (states, cache, n_rep, sub["x"], sub["dt"], sub["B"], sub["C"])
                            problem = {**p, **sub, "cache": cache, "n_replay": n_rep}
                            for final, tag in [(False, "")] + [(True, "_final")] * also_final:
                                vop = jax.jit(lambda h, c, n, x, dt, B, C, final=final: K.ssm_verify(
                                    h, c, n, x, dt, B, C, final_state=final, **kw)[:3])
                                vrun = jax.jit(lambda hs, *a, vop=vop: [vop(h, *a) for h in hs])
                                row[f"verify{k}{tag}_us"] = _time(vrun, args, reps) / layers * 1e6
                                row[f"verify{k}{tag}_bytes"] = _min_bytes(problem, variant, True, final)
                except Exception as e:  # noqa: BLE001 - report and carry on
                    row["error"] = f"{type(e).__name__}: {str(e)[:800]}"
                    print(f"  {variant} B={batch} {backend}: FAILED {row['error']}")
                results.append(row)
                print(f"  {variant} B={batch} {backend}: " + ", ".join(
                    f"{key}={val:.1f}" for key, val in row.items() if key.endswith("_us")
                ), flush=True)
    return results


def tables(results, ks):
    lines = []
    head = "| variant | B | backend | step µs | " + " | ".join(f"K={k} µs (×step)" for k in ks) + " |"
    lines += [head, "|" + "---|" * (4 + len(ks))]
    for r in results:
        if "step_us" not in r:
            continue
        cells = [
            (f"{r[f'verify{k}_us']:.1f} ({r[f'verify{k}_us'] / r['step_us']:.2f})"
             + (f"; final state too {r[f'verify{k}_final_us']:.1f} ({r[f'verify{k}_final_us'] / r['step_us']:.2f})"
                if f"verify{k}_final_us" in r else "")) if f"verify{k}_us" in r else "-"
            for k in ks
        ]
        head = f"| {r['variant']} | {r['batch']} | {r['backend']} | {r['step_us']:.1f} | "
        lines.append(head + " | ".join(cells) + " |")
    lines += ["", "Bytes moved per layer (minimum), their time at 4.2 TB/s, and the fastest backend's TB/s:", ""]
    lines += [
        "| variant | B | state MiB | step MB | step floor µs | step TB/s | "
        + " | ".join(f"K={k} floor µs (TB/s)" for k in ks)
        + " |"
    ]
    lines += ["|" + "---|" * (6 + len(ks))]
    seen = set()
    for r in results:
        key = (r["variant"], r["batch"])
        if key in seen or "step_us" not in r:
            continue
        seen.add(key)
        same = [s for s in results if (s["variant"], s["batch"]) == key and "step_us" in s]
        best_step = min(s["step_us"] for s in same)
        cells = []
        for k in ks:
            have = [s[f"verify{k}_us"] for s in same if f"verify{k}_us" in s]
            b = r[f"verify{k}_bytes"] if f"verify{k}_bytes" in r else None
            tbs = b / (min(have) * 1e-6) / 1e12 if have and b else None
            cells.append(f"{b / HBM_BYTES_PER_S * 1e6:.1f} ({tbs:.2f})" if tbs is not None else "-")
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['state_bytes'] / 2**20:.2f} | {r['step_bytes'] / 1e6:.2f} | "
            f"{r['step_bytes'] / HBM_BYTES_PER_S * 1e6:.2f} | {r['step_bytes'] / (best_step * 1e-6) / 1e12:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batches 1 and 64, K in 1, 4, 8")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new timings after this many seconds")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--backends", default="", help="comma-separated subset (default: all available)")
    ap.add_argument("--pallas-forms", default="",
                    help="also time the pallas kernels in these other forms of pallas_ssm.set_form, comma-separated "
                         "(unrolled, matrix), as backends pallas-unrolled / pallas-matrix")
    ap.add_argument("--final-state", action="store_true",
                    help="also time the verification that writes the state after its new tokens (MiL's second "
                    "state), beside")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args(argv)

    print(f"jax {jax.__version__}, devices {jax.devices()}")
    backends = [b for b in K.available_backends() if not args.backends or b in args.backends.split(",")]
    forms = [f for f in args.pallas_forms.split(",") if f]
    unknown = [f for f in forms if f"pallas-{f}" not in PALLAS_FORMS]
    if unknown:
        known = ", ".join(f[len("pallas-"):] for f in PALLAS_FORMS)
        ap.error(f"--pallas-forms takes {known}; got {', '.join(unknown)}")
    if "pallas" in backends:
        backends[backends.index("pallas") + 1:backends.index("pallas") + 1] = [f"pallas-{f}" for f in forms]
    missing = [b for b in K.BACKENDS if b not in K.available_backends()]
    print(f"backends: {backends}; unavailable here: {missing or 'none'}")
    batches, ks = ((1, 64), (1, 4, 8)) if args.quick else ((1, 16, 64), tuple(range(1, 9)))
    ok, check_rows = check(backends)
    # the kernels first: if the time budget runs out, the reference is what goes untimed
    results = bench(sorted(backends, key=lambda b: b == "xla"), batches, ks, args.budget_s, args.reps,
                    args.final_state)
    table = tables(results, ks)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        report = json.dumps(dict(checks=check_rows, timings=results), indent=1, default=str)
        (Path(args.out) / "results.json").write_text(report)
    print(f"\n## Summary ({jax.devices()[0].device_kind}; checks {'passed' if ok else 'FAILED'})\n")
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
