"""The hybridize command on the real SmolLM2 teacher: builds a MiL hybrid, saves it, prints the perplexities.

Before any training, MiL's exact initialisation is NOT better than a random one on SmolLM2 (the gated norm
feeds unit-RMS activations into the teacher's o_proj; see RESULTS.md): the test checks the command and the
numbers' sanity, and experiments/init_ablation.py measures the two initialisations after distillation.
"""
import re

import l2m_jax
from l2m_jax.convert.hybridize import main


def test_hybridize_command_on_smollm2(capsys, tmp_path):
    main(["--teacher", "smollm2", "--attn-fraction", "0.5", "--mixer", "mamba2", "--max-tokens", "256",
          "--out", str(tmp_path / "hybrid"), "--format", "mil"])
    out = capsys.readouterr().out
    print(out)  # the three perplexities go to the test log
    ppl = {name: float(v) for name, v in re.findall(r"^(\S+)\s.*ppl ([\d.]+)$", out, flags=re.M)}
    assert set(ppl) == {"teacher", "attention-initialised", "randomly-initialised"}
    assert 1 < ppl["teacher"] < 100
    assert min(ppl["attention-initialised"], ppl["randomly-initialised"]) > 2 * ppl["teacher"]
    cfg, _ = l2m_jax.load(tmp_path / "hybrid")
    assert cfg.pattern == "SA" * 15
