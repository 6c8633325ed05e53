"""The lm-eval-harness model "l2m_jax", offline, on YAML tasks over local JSONL files written by the test."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

import l2m_jax  # noqa: E402
from tests.conftest import save_tiny_chat_teacher  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

MC = [{"question": "Which is a colour?", "choices": ["red", "seven", "under"], "label": 0},
      {"question": "Pick the number", "choices": ["blue", "three"], "label": 1},
      {"question": "Sound of a cat?", "choices": ["meow", "woof", "moo", "quack"], "label": 0}]
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog."},
         {"text": "A much longer document: " + "tokens roll over the window boundary. " * 12}]
_forward = jax.jit(l2m_jax.forward, static_argnums=0)   # one unpadded sequence per call: no batching, no padding
GEN = [{"question": "Say hi:", "answer": "hi"}, {"question": "Two plus two is", "answer": "four"}]


def _task(name, data, output_type, body):
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\noutput_type: {output_type}\n{body}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm_eval")
    teacher = save_tiny_chat_teacher(base / "teacher")
    tasks = base / "tasks"
    tasks.mkdir()
    for name, rows in [("mc", MC), ("text", TEXTS), ("gen", GEN)]:
        (base / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "mc.yaml").write_text(_task("l2m_tiny_mc", base / "mc.jsonl", "multiple_choice",
                                         'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: choices\n'
                                         "doc_to_target: label\nmetric_list:\n  - metric: acc\n"))
    (tasks / "text.yaml").write_text(_task("l2m_tiny_ppl", base / "text.jsonl", "loglikelihood_rolling",
                                           'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
                                           "  - metric: word_perplexity\n  - metric: bits_per_byte\n"))
    (tasks / "gen.yaml").write_text(_task("l2m_tiny_gen", base / "gen.jsonl", "generate_until",
                                          'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                                          'generation_kwargs:\n  until: ["\\n", "e"]\n  max_gen_toks: 6\n'
                                          "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"))
    return dict(teacher, tasks=str(tasks), base=base)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets", raising=False)


def _reference_ll(s, context, continuation):
    """Sum of log-softmax of l2m_jax.forward's logits over the continuation tokens (lm_eval's split)."""
    tok = s["tok"]
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    cont = whole[len(ctx):]
    logits, _ = _forward(s["cfg"], s["params"], np.array([whole[:-1]], np.int32))
    logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
    rows = np.arange(len(whole) - len(cont) - 1, len(whole) - 1)
    return float(np.sum(np.asarray(logp)[rows, cont])), bool(np.all(np.argmax(logp[rows], -1) == np.array(cont)))


def test_loglikelihoods_equal_forward(setup):
    from lm_eval.api.instance import Instance

    from l2m_jax.eval.lm_eval_adapter import L2MJaxLM

    lm = L2MJaxLM(pretrained=setup["dir"], batch_size=2)
    pairs = [("Question: Which is a colour?\nAnswer:", " red"), ("Pick", " the number three, please"),
             ("x", "y"), ("Hello ", "world")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ctx_s = ctx.rstrip(" ")
        want, want_greedy = _reference_ll(setup, ctx_s, ctx[len(ctx_s):] + cont)
        assert abs(ll - want) <= 1e-5 * max(1.0, abs(want)), (ctx, cont, ll, want)
        assert greedy == want_greedy
    # rolling: one window per short text, several (each token once) when the text outgrows max_length
    lm_small = L2MJaxLM(pretrained=setup["dir"], batch_size=3, max_length=32)
    text = TEXTS[1]["text"]
    roll = lm_small.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    ids = setup["tok"].encode(text, add_special_tokens=False)
    assert len(ids) > 64
    from lm_eval import utils
    want = sum(_reference_ll_ids(setup, ctx_ids, pred) for ctx_ids, pred in
               map(utils.make_disjoint_window, utils.get_rolling_token_windows(ids, 1, 32, 1)))
    assert abs(roll - want) <= 1e-5 * abs(want)


def _reference_ll_ids(s, ctx, cont):
    whole = list(ctx) + list(cont)
    logits, _ = _forward(s["cfg"], s["params"], np.array([whole[:-1]], np.int32))
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1))
    return float(np.sum(logp[np.arange(len(ctx) - 1, len(whole) - 1), cont]))


def test_generate_until_stops_at_until_strings(setup):
    from lm_eval.api.instance import Instance

    from l2m_jax.data.chat import encode_text
    from l2m_jax.eval.lm_eval_adapter import L2MJaxLM

    lm = L2MJaxLM(pretrained=setup["dir"], batch_size=2)
    prompts = ["Say hi:", "Two plus two is", "Once"]
    free = l2m_jax.generate(setup["cfg"], setup["params"], [encode_text(setup["tok"], p) for p in prompts], 12,
                            eos_id=2)
    texts = [setup["tok"].decode(t, skip_special_tokens=True) for t in free]
    stop = next(c for c in texts[0][2:] if c.isascii() and c.isprintable())   # one the first row produces
    reqs = [Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 12}), i)
            for i, p in enumerate(prompts)]
    got = lm.generate_until(reqs)
    assert got == [t.split(stop)[0] for t in texts]


def test_simple_evaluate_scores_local_tasks(setup, offline):
    import l2m_jax.eval.lm_eval_adapter  # noqa: F401  (registers "l2m_jax")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=setup["tasks"], include_defaults=False)
    out = lm_eval.simple_evaluate(model="l2m_jax", model_args=f"pretrained={setup['dir']},batch_size=4",
                                  tasks=["l2m_tiny_mc", "l2m_tiny_ppl", "l2m_tiny_gen"], task_manager=tm,
                                  log_samples=True, bootstrap_iters=0)
    res = out["results"]
    assert 0.0 <= res["l2m_tiny_mc"]["acc,none"] <= 1.0
    assert res["l2m_tiny_ppl"]["word_perplexity,none"] > 1.0 and res["l2m_tiny_ppl"]["bits_per_byte,none"] > 0
    assert res["l2m_tiny_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)
    # every multiple-choice loglikelihood lm_eval recorded is l2m_jax.forward's
    samples = out["samples"]["l2m_tiny_mc"]
    assert len(samples) == len(MC)
    for s in samples:
        for args, resp in zip(s["arguments"], s["resps"]):
            a = list(args.values()) if isinstance(args, dict) else list(args)
            ll = float(resp[0][0])
            want, _ = _reference_ll(setup, a[0], a[1])
            assert abs(ll - want) <= 1e-5 * max(1.0, abs(want))


def test_command_line_wrapper(setup):
    """`python -m l2m_jax.eval.lm_eval_adapter` is lm_eval's CLI with the model registered."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **OFFLINE)
    env["HF_DATASETS_CACHE"] = str(setup["base"] / "datasets")
    out = setup["base"] / "results"
    proc = subprocess.run([sys.executable, "-m", "l2m_jax.eval.lm_eval_adapter", "--model_args",
                           f"pretrained={setup['dir']}", "--tasks", "l2m_tiny_mc", "--include_path", setup["tasks"],
                           "--output_path", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "l2m_tiny_mc" in proc.stdout and "acc" in proc.stdout and "Tasks" in proc.stdout, proc.stdout[-2000:]
    assert "os.fork()" not in proc.stderr                 # the results table is formatted in this process
    results = list(out.rglob("results_*.json"))
    assert len(results) == 1 and "l2m_tiny_mc" in json.loads(results[0].read_text())["results"]


def test_the_installed_entry_point_resolves_through_lm_evals_registry():
    """The package declares the model in the entry-point group `lm_eval.models`, which lm-eval's plugin discovery
    (releases after 0.4.13) records as a lazy placeholder; lm-eval's own Registry materialises it to the adapter."""
    from importlib.metadata import entry_points

    from lm_eval.api.model import LM
    from lm_eval.api.registry import Registry

    from l2m_jax.eval.lm_eval_adapter import L2MJaxLM

    found = [ep for ep in entry_points(group="lm_eval.models") if ep.name == "l2m_jax"]
    assert len(found) == 1, "reinstall the package (pip install -e .) so its entry points are recorded"
    registry = Registry("model", base_cls=LM)             # a fresh one: the process-wide registry is left alone
    registry.register("l2m_jax", target=found[0])
    assert registry.get("l2m_jax") is L2MJaxLM
