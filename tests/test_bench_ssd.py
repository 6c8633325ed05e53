"""`python -m experiments.bench_ssd --quick` (tiny shapes, Pallas in interpret mode on the CPU): every backend's
outputs and gradients are checked against the XLA scan before anything is timed, and the checks pass."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_checks_outputs_and_gradients(tmp_path):
    out = tmp_path / "ssd.json"
    done = subprocess.run([sys.executable, "-m", "experiments.bench_ssd", "--quick", "--backends",
                           "xla,pallas,pallas-xla-bwd", "--sizes", "2x80", "--json", str(out)], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"xla", "pallas", "pallas-xla-bwd"}
    for name in ("pallas", "pallas-xla-bwd"):
        assert rows[name]["check"] == "ok" and rows[name]["batch"] == 2 and rows[name]["length"] == 80
        assert 0 <= rows[name]["rel_grad"] < 2e-2 and rows[name]["fwd_bwd_ms"] > 0
    assert rows["pallas"]["rel_grad"] > 0           # the fused backward is not the reference's VJP itself
    assert "| 2×80 | pallas |" in done.stdout
