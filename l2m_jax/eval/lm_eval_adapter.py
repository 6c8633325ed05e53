"""lm-evaluation-harness (`pip install lm-eval`) model "l2m_jax": any model `l2m_jax.load` reads, scored in JAX.

    python -m l2m_jax.eval.lm_eval_adapter --model_args pretrained=DIR --tasks hellaswag,arc_easy [lm_eval flags]

    import l2m_jax.eval.lm_eval_adapter, lm_eval          # the import registers the model
    lm_eval.simple_evaluate(model="l2m_jax", model_args="pretrained=DIR", tasks=[...])

lm_eval finds only the models it imports itself (it reads no plugin entry points), so the plain `lm_eval`
command does not know "l2m_jax": `python -m l2m_jax.eval.lm_eval_adapter` is lm_eval's own command line
(`run`, `ls`, `validate`, every flag) with this module imported and `--model l2m_jax` as the default model.

model_args: pretrained (required: an l2m/MiL/HF directory, a .gguf file or "smollm2"), tokenizer (default:
the one saved beside the model), batch_size (default 8), max_length (default: the model's
max_position_embeddings), max_gen_toks (default 256), backend ("xla" | "pallas" | "triton"), dtype (cast the
parameters, e.g. bfloat16), add_bos_token (default false), prefix_token_id (default: BOS, else EOS).

Scores are the fp32 log-softmax of `l2m_jax.forward`'s logits summed over the continuation tokens in float64
(loglikelihood; `is_greedy` compares with the argmax), rolling windows of `max_length` tokens for
loglikelihood_rolling (each token scored once, lm_eval's windowing), and greedy or sampled decoding with
`l2m_jax.infer.stream.generate_stream` for generate_until, which stops as soon as every row of a batch has
produced one of its `until` strings (or EOS) or `max_gen_toks` tokens; the text is cut before the first stop
string.
"""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..ops import keyed_jit

__all__ = ["L2MJaxLM", "main"]

_LENGTH_BUCKET = 32          # padded sequence lengths are multiples of it: few compilations


@keyed_jit(static_argnums=0)
def _token_logprobs(cfg, params, tokens, targets):
    """tokens/targets int32 [B, L] -> (log p(target) fp32 [B, L], target is the argmax bool [B, L])."""
    from .. import forward

    logits, _ = forward(cfg, params, tokens)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    got = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return got, jnp.argmax(logits, axis=-1) == targets


def _as_bool(v) -> bool:
    if isinstance(v, str):
        if v.lower() in ("1", "true", "yes"):
            return True
        if v.lower() in ("0", "false", "no", ""):
            return False
        raise ValueError(f"expected a boolean, got {v!r}")
    return bool(v)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class L2MJaxLM(TemplateLM):
    """lm_eval's LM interface over an l2m_jax model (see the module docstring for model_args)."""

    def __init__(self, pretrained: str, tokenizer: str | None = None, batch_size=8, max_length=None,
                 max_gen_toks=256, backend: str = "xla", dtype: str | None = None, add_bos_token=False,
                 prefix_token_id=None, max_batch_size=None, device=None, **kwargs):
        super().__init__()
        import l2m_jax
        from ..generate import _check_model_path, resolve_tokenizer

        if kwargs:
            raise ValueError(f"l2m_jax model: unknown model_args {sorted(kwargs)}; known: pretrained, tokenizer, "
                             "batch_size, max_length, max_gen_toks, backend, dtype, add_bos_token, prefix_token_id")
        pretrained = str(pretrained)
        _check_model_path(pretrained, "pretrained=")
        self.tokenizer = resolve_tokenizer(pretrained, tokenizer)
        self.cfg, self.params = l2m_jax.load(pretrained)
        if dtype is not None:
            dt = jnp.dtype(dtype)
            self.cfg = self.cfg.replace(dtype=str(dt), param_dtype=str(dt))
            self.params = jax.tree.map(lambda a: a.astype(dt), self.params)
        if len(self.tokenizer) > self.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but {pretrained!r} has a vocabulary of "
                             f"{self.cfg.vocab_size}: pass the model's own tokenizer (tokenizer=...)")
        self.pretrained = pretrained
        bs = str(batch_size if batch_size is not None else 8)
        self.batch_size = 8 if bs.startswith("auto") else int(bs)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self._max_length = int(max_length) if max_length is not None else int(self.cfg.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.backend_name = backend
        self.add_bos_token = _as_bool(add_bos_token)
        self._prefix = None if prefix_token_id is None else int(prefix_token_id)

    # ---------------------------------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        t = self.tokenizer.eos_token_id
        return int(t if t is not None else self.cfg.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is not None:
            return self._prefix
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer.encode(string, add_special_tokens=special))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ---------------------------------------------------------------------------------------- scoring
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) for token-id pairs.

        Each sequence is cut on the left to `max_length` inputs; batches of `batch_size` rows (sorted by
        length) are right-padded to a multiple of 32 positions, which never changes a causal model's logits
        at the real positions.
        """
        results: list = [None] * len(pairs)
        rows = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                results[i] = (0.0, True)
                continue
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            if len(whole) < 2:
                raise ValueError("a loglikelihood request needs at least one context token")
            rows.append((i, whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
        rows.sort(key=lambda r: -len(r[1]))
        for s in range(0, len(rows), self.batch_size):
            group = rows[s:s + self.batch_size]
            width = min(_round_up(len(group[0][1]), _LENGTH_BUCKET), max(self.max_length, len(group[0][1])))
            tokens = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros((self.batch_size, width), np.int32)
            for j, (_, inp, tgt, _) in enumerate(group):
                tokens[j, :len(inp)], targets[j, :len(tgt)] = inp, tgt
            logp, greedy = _token_logprobs(self.cfg, self.params, jnp.asarray(tokens), jnp.asarray(targets))
            logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
            for j, (i, inp, _, n) in enumerate(group):
                span = slice(len(inp) - n, len(inp))
                results[i] = (float(np.sum(logp[j, span])), bool(np.all(greedy[j, span])))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = self.score_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for w in map(utils.make_disjoint_window,
                         utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                         prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)):
                windows.append(w)
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, self.score_tokens(windows)):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ---------------------------------------------------------------------------------------- generation
    def _settings(self, gen_kwargs: dict):
        from ..ops.sampling import Sampling

        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eos = self.tok_decode([self.eot_token_id]) or self.tokenizer.decode([self.eot_token_id])
        if eos and eos not in until:
            until.append(eos)
        max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
        do_sample = _as_bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
        top_k = int(kw.pop("top_k", 0) or 0)
        top_p = float(kw.pop("top_p", 1.0) or 1.0)
        seed = int(kw.pop("seed", 0) or 0)
        if not do_sample:
            temperature = 0.0
        return [u for u in until if u], max_gen, Sampling(temperature=temperature, top_k=top_k, top_p=top_p), seed

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ..infer.stream import generate_stream

        results: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for key_str, idx in groups.items():
            until, max_gen, sampling, seed = self._settings(requests[idx[0]].args[1])
            if max_gen < 1:
                for i in idx:
                    results[i] = ""
                continue
            if self.cfg.attn_layers and max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for a prompt in max_length={self.max_length}")
            budget = self.max_length - max_gen if self.cfg.attn_layers else None
            encoded = []
            for i in idx:
                ids = self.tok_encode(requests[i].args[0]) or [self.prefix_token_id]
                encoded.append((i, ids[-budget:] if budget else ids))
            encoded.sort(key=lambda e: -len(e[1]))
            for s in range(0, len(encoded), self.batch_size):
                group = encoded[s:s + self.batch_size]
                toks = [[] for _ in group]
                texts = [""] * len(group)
                stream = generate_stream(self.cfg, self.params, [ids for _, ids in group], max_gen,
                                         sampling=sampling, eos_id=self.eot_token_id,
                                         key=jax.random.key(seed), backend=self.backend_name, chunk=8)
                for chunk in stream:
                    for j, new in enumerate(chunk):
                        toks[j] += new
                        if new:
                            texts[j] = self.tok_decode(toks[j])
                    # a trailing U+FFFD may be an incomplete character that later tokens complete
                    if all(any(u in t.rstrip("\ufffd") for u in until) or (tk and tk[-1] == self.eot_token_id)
                           for t, tk in zip(texts, toks)):
                        stream.close()
                        break
                for (i, _), text in zip(group, texts):
                    cut = min([text.index(u) for u in until if u in text], default=len(text))
                    results[i] = text[:cut]
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results


if __name__ != "__main__":
    register_model("l2m_jax")(L2MJaxLM)


def _table_headers_compat() -> None:
    """pytablewriter before 0.47 calls the table header `header_list`; lm_eval sets `headers`, which such a
    version ignores (the results table then shows A, B, C... as its header). Alias one to the other, and keep
    such a version's cell formatting in this process (it forks a process pool by default, under JAX)."""
    try:
        from pytablewriter import MarkdownTableWriter
    except ImportError:
        return
    if hasattr(MarkdownTableWriter, "headers"):
        return
    for cls in MarkdownTableWriter.__mro__:            # the base class that defines header_list
        if "header_list" in vars(cls):
            def set_headers(self, value):
                self.header_list = value
                extractor = getattr(self, "_dp_extractor", None)
                if extractor is not None and hasattr(extractor, "max_workers"):
                    extractor.max_workers = 1

            cls.headers = property(lambda self: self.header_list, set_headers)
            return


def main(argv: list[str] | None = None) -> int:
    """lm_eval's command line with this model registered; `--model l2m_jax` unless another --model is given."""
    from lm_eval.__main__ import cli_evaluate

    _table_headers_compat()

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run", "ls", "validate"}
    if not any(a == "--model" or a.startswith("--model=") for a in argv) and not (argv and argv[0] in {"ls",
                                                                                                     "validate"}):
        if argv and argv[0] in commands:
            argv = [argv[0], "--model", "l2m_jax"] + argv[1:]
        elif argv and argv[0] not in ("-h", "--help"):
            argv = ["--model", "l2m_jax"] + argv
    saved = sys.argv
    sys.argv = ["lm-eval"] + argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    from l2m_jax.eval.lm_eval_adapter import main as _main   # registers the model under this module's real name

    sys.exit(_main())
