"""The stages' losses on an fsdp mesh gather each layer's weights, not the batch's rows (`stages.weight_gather`).

A ("data", "fsdp") mesh splits the batch's rows over both axes and every large weight over "fsdp". Left to
itself, XLA's partitioner kept those weights split and gathered all rows of the batch onto each device instead
(per-device activations growing with the fsdp size). The stage setups' losses on such a mesh apply
`parallel.fsdp_gather`, in the real run (`run_setup`) and in the program compiled ahead (`precompile_stage`).
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

_RUN = textwrap.dedent("""
    import json, re, jax, numpy as np
    import l2m_jax
    from l2m_jax import parallel
    from l2m_jax.config import ModelConfig, default_ssm_config
    from l2m_jax.train import stages
    from l2m_jax.train.loop import precompile_step
    from l2m_jax.train.optim import StagePreset

    assert len(jax.devices()) == 8
    t_cfg = ModelConfig.tiny(n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32)   # 2 heads: [4, 256, ...] are rows
    s_cfg = t_cfg.replace(layer_mixers=("attention", "mamba2"), ssm=default_ssm_config(t_cfg, "mamba2"))
    teacher = l2m_jax.init_params(t_cfg, jax.random.key(0))
    student = l2m_jax.init_params(s_cfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    data = {"tokens": rng.integers(0, t_cfg.vocab_size, (8, 256)).astype(np.int32),   # one row per device
            "loss_mask": rng.random((8, 256)) < 0.8}
    settings = stages.StageSettings(steps=2, batch_size=8, progress=False, preset=StagePreset(
        lr=1e-2, warmup_steps=0, ce_weight=1.0, kl_weight=0.1))

    def rows(compiled):
        # buffers of the 4 rows of an fsdp group or all 8 rows [4|8, 256, ...]; collectives moving activations
        text = compiled.as_text()
        moved = [line.split("=", 1)[1].split("{")[0].strip() for line in text.splitlines()
                 if re.search(r"= .*(all-gather|all-to-all|collective-permute)\\(", line)]
        return {"all_rows": sorted(set(re.findall(r"[a-z0-9]+\\[[48],256,[0-9,]+\\]", text))),
                "moved": sorted({m for m in moved if re.search(r"[\\[,]256[\\],]", m)})}

    out = {}
    for name, mesh in [("1", parallel.make_mesh(devices=jax.devices()[:1])), ("2x4", parallel.make_mesh(2, 4))]:
        setup = stages.distill_setup((s_cfg, student), (t_cfg, teacher), settings)
        batch = stages.stage_batch(setup, settings, data)
        out[name] = {"gather": stages.weight_gather(mesh) is not None,
                     **rows(stages.precompile_stage(setup, settings, batch, mesh=mesh)[0]),
                     "loss": [h["loss"] for h in stages.distill_stage((s_cfg, student), (t_cfg, teacher), data,
                                                                     settings, mesh=mesh).history]}
        if name == "2x4":   # the same step without the gather: what the test would catch
            tx = settings.preset.make_optimizer(settings.steps)
            plain = precompile_step(setup.make_loss(gather=None), setup.params, setup.mask, tx, mesh, batch)[0]
            out["2x4-plain"] = rows(plain)
    print("RESULT" + json.dumps(out))
""")


def test_stage1_on_an_fsdp_mesh_gathers_weights_not_rows():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    proc = subprocess.run([sys.executable, "-c", _RUN], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert not out["1"]["gather"] and out["2x4"]["gather"]
    # without the gather XLA gathers the rows of each fsdp group (data rows stay split): what this test catches
    assert out["2x4-plain"]["all_rows"] and out["2x4-plain"]["moved"], out["2x4-plain"]
    # with it, no device holds another device's rows and the collectives move weights only
    assert out["2x4"]["all_rows"] == [] and out["2x4"]["moved"] == [], out["2x4"]
    ref = out["1"]["loss"]
    assert len(ref) == 2 and ref[0] != ref[1]
    np.testing.assert_allclose(out["2x4"]["loss"], ref, rtol=1e-5, atol=1e-6)
