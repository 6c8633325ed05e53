"""`python -m experiments.bench_attn_decode --quick` (tiny shapes, Pallas in interpret mode on the CPU): every
path is checked against the full-cache reference before it is timed, and the checks pass."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_checks_every_path(tmp_path):
    paths = ("pallas", "pallas:16x2", "blocked", "full")         # pallas:16x2: the kernel with given tiles
    done = subprocess.run([sys.executable, "-m", "experiments.bench_attn_decode", "--quick", "--reps", "1",
                           "--paths", ",".join(paths), "--out", str(tmp_path)], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((tmp_path / "attn_decode.json").read_text())
    assert [(r["batch"], r["tokens"]) for r in rows] == [(1, 1), (2, 5)]
    for r in rows:
        assert r["full_err"] == 0 and all(0 < r[f"{p}_err"] < 2e-2 for p in paths[:3])   # bf16 roundings
        assert all(r[f"{p}_us"] > 0 for p in paths)
    assert "checks passed" in done.stdout and "| 2 | 5 | 100 | 128 |" in done.stdout


def test_pallas_path_needs_a_gpu_or_quick():
    done = subprocess.run([sys.executable, "-m", "experiments.bench_attn_decode", "--paths", "pallas,full"], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "needs a GPU" in done.stderr


def test_bad_tiles_are_refused(capsys):
    import pytest

    from experiments import bench_attn_decode

    for bad in ("pallas:48x1", "pallas:64", "pallas:64x-1", "flash"):
        with pytest.raises(SystemExit) as e:
            bench_attn_decode.main(["--quick", "--paths", bad])
        assert e.value.code == 2 and "pallas:BLOCKxSPLITS" in capsys.readouterr().err, bad
