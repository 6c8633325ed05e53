"""experiments.bench_verify at tiny shapes on the CPU (the xla backend): the verification is
timed as the models call it (one state out) and, with also_final, writing the running state too; the byte
floors differ by exactly one state."""
import pytest

from experiments import bench_verify


@pytest.fixture
def tiny_shapes(monkeypatch):
    monkeypatch.setattr(bench_verify, "SHAPES", {"mamba2": dict(heads=2, head_dim=8, dstate=16, groups=(1, 1, 2)),
                                                 "mamba": dict(channels=16, dstate=8, groups=(2, 4))})


def test_bench_times_the_verification_with_and_without_its_final_state(tiny_shapes):
    rows = bench_verify.bench(["xla"], [2], [1, 3], budget_s=600, reps=1, also_final=True)
    assert [(r["variant"], r["backend"]) for r in rows] == [("mamba2", "xla"), ("mamba", "xla")]
    for r in rows:
        assert "error" not in r, r.get("error")
        for k in (1, 3):
            assert r[f"verify{k}_us"] > 0 and r[f"verify{k}_final_us"] > 0
            assert r[f"verify{k}_final_bytes"] - r[f"verify{k}_bytes"] == r["state_bytes"]
    table = bench_verify.tables(rows, [1, 3])
    assert "final state too" in table and "| mamba2 | 2 | xla |" in table
