"""generate_stream hands out exactly generate's tokens, chunk by chunk, and computes no more than it is asked."""
import jax
import pytest

import l2m_jax
from l2m_jax.infer.stream import generate_stream
from l2m_jax.ops.sampling import Sampling


def _joined(chunks, rows):
    out = [[] for _ in range(rows)]
    for c in chunks:
        for r, new in zip(out, c):
            r += new
    return out


@pytest.mark.parametrize("name,chunk,sampled", [("teacher", 1, True), ("hybrid50-mamba2", 3, False)])
def test_stream_equals_generate(models, name, chunk, sampled):
    cfg, params = models[name]
    prompts = [[3, 1, 4, 1, 5, 9], [2, 7]]
    settings = [(None, None)] + ([(Sampling(temperature=0.9, top_p=0.9), jax.random.key(5))] if sampled else [])
    for sampling, key in settings:
        want = l2m_jax.generate(cfg, params, prompts, 9, sampling=sampling, key=key)
        chunks = list(generate_stream(cfg, params, prompts, 9, sampling=sampling, key=key, chunk=chunk))
        # the first token straight after the prefill, then chunks (the last one shorter)
        assert [len(c[0]) for c in chunks] == [1] + [chunk] * (8 // chunk) + ([8 % chunk] if 8 % chunk else [])
        assert _joined(chunks, 2) == want


def test_stream_stops_rows_at_eos_and_can_be_abandoned(models):
    cfg, params = models["teacher"]
    prompts = [[1, 2, 3], [7, 8]]
    free = l2m_jax.generate(cfg, params, prompts, 10)
    eos = free[0][3]
    want = l2m_jax.generate(cfg, params, prompts, 10, eos_id=eos)
    assert _joined(generate_stream(cfg, params, prompts, 10, eos_id=eos, chunk=3), 2) == want
    stream = generate_stream(cfg, params, prompts, 10, chunk=3)
    first = next(stream)
    stream.close()                                       # a consumer that has enough stops the decoding
    assert first == [r[:1] for r in free]
