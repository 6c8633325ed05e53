import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu":
    # the suite's programs are tiny and compiled once each: XLA's CPU back-end spends most of its time in LLVM's
    # optimisation passes, which these flags skip (the suite's CPU time falls by about 40%; values are unchanged
    # within every test's tolerance). Subprocesses of the tests inherit them.
    _FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def rel_err(a, b) -> float:
    """‖a − b‖_max / ‖b‖_max: whole-model tolerances are judged relative to the reference's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="session")
def torch_cpu():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    return torch


def save_tiny_chat_teacher(directory) -> dict:
    """The tiny random teacher with the byte-level ChatML tokenizer, saved (l2m format + tokenizer) in
    `directory`: {"dir", "cfg", "params", "tok"} for the command-line and adapter tests."""
    import jax

    import l2m_jax
    from l2m_jax.recipe.data import byte_chatml_tokenizer

    tok = byte_chatml_tokenizer()
    cfg = l2m_jax.ModelConfig.tiny(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                   max_position_embeddings=256)
    params = l2m_jax.init_params(cfg, jax.random.key(0))
    l2m_jax.save(str(directory), cfg, params, format="l2m")
    tok.save_pretrained(str(directory))
    return dict(dir=str(directory), cfg=cfg, params=params, tok=tok)
