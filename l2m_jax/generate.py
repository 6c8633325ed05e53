"""Talk to a model from the terminal: one prompt (streamed), a JSONL file of prompts, or an interactive chat.

    python -m l2m_jax.generate --model DIR_OR_NAME --prompt "What is the capital of France?"
    python -m l2m_jax.generate --model DIR --prompts prompts.jsonl --output answers.jsonl [--batch-size 8]
    python -m l2m_jax.generate --model DIR --chat
    python -m l2m_jax.generate --model DIR --draft DRAFT_DIR --k 4 --prompt "..."

--model takes every format `l2m_jax.load` reads (an l2m or MiL checkpoint directory, an HF directory, a .gguf
file, the name "smollm2"); the tokenizer is the one saved beside the model (or --tokenizer). Prompts are put
through the tokenizer's chat template (as one user turn) unless --no-template, and generation stops at the
template's end-of-turn token. A single prompt is streamed to stdout as it is decoded; a prompts file gives one
JSON line {"prompt", "response", "tokens", "finished"} per prompt; --chat reads user lines from stdin and keeps
the conversation (/reset forgets it, /exit or end of input ends it). Speed (tokens/s, and for --draft the
acceptance rate and tokens per verifier call) goes to stderr.

A prompts file holds one prompt per line: a JSON string, {"prompt": "..."}, or {"messages": [{"role", "content"},
...]} (a whole conversation ending with a user turn; used as is).

Importing this module leaves `l2m_jax.generate(cfg, params, prompts, max_new_tokens, ...)` the generation
function: the module object itself is callable and forwards to `l2m_jax.infer.generate.generate`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

from .infer.generate import generate as _generate_fn

__all__ = ["main", "resolve_tokenizer", "encode_prompt", "TextStream"]


class _CallableModule(types.ModuleType):
    """`l2m_jax.generate` stays the generation function after `import l2m_jax.generate`."""

    def __call__(self, *args, **kwargs):
        """l2m_jax.generate(cfg, params, prompts, max_new_tokens, sampling=None, eos_id=None, key=None, ...):
        new tokens per prompt; see `l2m_jax.infer.generate.generate`."""
        return _generate_fn(*args, **kwargs)


if __name__ != "__main__":
    sys.modules[__name__].__class__ = _CallableModule
    __wrapped__ = _generate_fn      # inspect.signature(l2m_jax.generate) shows the function's signature

class UsageError(ValueError):
    """A command-line input this command cannot use; the message says what to change."""


# ------------------------------------------------------------------------------------------------ loading
def _check_model_path(spec: str, flag: str = "--model") -> None:
    if spec != "smollm2" and not os.path.exists(spec):
        raise UsageError(f"{flag} {spec!r}: no such file or directory; pass an l2m_jax or MiL checkpoint "
                         "directory, an HF model directory, a .gguf file, or the name 'smollm2'")


def resolve_tokenizer(model: str, tokenizer: str | None = None):
    """The tokenizer for `model`: `tokenizer` if given, else the one saved beside the model (or the name's own)."""
    import l2m_jax
    from l2m_jax.data.tokenizer import TOKENIZER_FILES, has_tokenizer

    if tokenizer is not None:
        return l2m_jax.load_tokenizer(tokenizer)
    if os.path.isdir(model) and not has_tokenizer(model):
        raise UsageError(f"no tokenizer beside the model in {model!r} (none of {list(TOKENIZER_FILES)}): save the "
                         f"tokenizer there (tokenizer.save_pretrained({model!r})) or pass --tokenizer SOURCE "
                         "(an HF tokenizer directory, a .gguf file or 'smollm2')")
    return l2m_jax.load_tokenizer(model)


def _load_draft(path: str, t_cfg, t_tok, tokenizer_arg: str | None):
    """--draft's (cfg, params), checked against the model's vocabulary and (when saved beside the draft and no
    --tokenizer is given) tokenizer (`infer.speculative.check_draft_vocabulary`)."""
    import l2m_jax
    from l2m_jax.data.tokenizer import has_tokenizer
    from l2m_jax.infer.speculative import check_draft_vocabulary

    _check_model_path(path, "--draft")
    d_cfg, d_params = l2m_jax.load(path)
    d_tok = l2m_jax.load_tokenizer(path) if tokenizer_arg is None and has_tokenizer(path) else None
    try:
        check_draft_vocabulary(t_cfg, t_tok, d_cfg, d_tok, target="the model", draft=f"--draft {path!r}")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return d_cfg, d_params


# ------------------------------------------------------------------------------------------------ prompts
def encode_prompt(tok, prompt, *, template: bool = True, system: str | None = None) -> list[int]:
    """Token ids for a prompt: a string (one user turn) or a list of messages, through the chat template.

    template=False: a string is encoded as plain text (the tokenizer's own special tokens added).
    """
    from .data.chat import encode_chat_prompt

    if not template:
        if not isinstance(prompt, str):
            raise UsageError("--no-template takes plain-text prompts, not message lists")
        return [int(t) for t in tok(prompt)["input_ids"]]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}] + messages
    return [int(t) for t in encode_chat_prompt(tok, messages)]


def _stop_id(tok, cfg, template: bool) -> int | None:
    from .data.chat import TemplateError, end_of_turn_id

    if template:
        try:
            return end_of_turn_id(tok)
        except TemplateError:
            pass
    for t in (tok.eos_token_id, cfg.eos_token_id):
        if t is not None:
            return int(t)
    return None


def _check_fits(cfg, n_prompt: int, max_new: int, where: str, extra: int = 0) -> None:
    limit = cfg.max_position_embeddings
    if cfg.attn_layers and n_prompt + max_new + extra > limit:
        raise UsageError(f"{where} is {n_prompt} tokens; with --max-new-tokens {max_new} it needs "
                         f"{n_prompt + max_new + extra} positions but the model's context is {limit} "
                         "(max_position_embeddings): shorten the prompt or lower --max-new-tokens")


def _read_prompts(path: str) -> list:
    if not os.path.isfile(path):
        raise UsageError(f"--prompts {path!r} is not a file; pass a JSONL file with one prompt per line")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path} line {n}: not JSON ({e.msg})") from None
            if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                prompts.append(row["prompt"])
            elif isinstance(row, dict) and isinstance(row.get("messages"), list):
                prompts.append(row["messages"])
            elif isinstance(row, str):
                prompts.append(row)
            else:
                raise UsageError(f'{path} line {n}: expected a JSON string, {{"prompt": "..."}} or '
                                 f'{{"messages": [...]}}, got {line.strip()[:80]}')
    if not prompts:
        raise UsageError(f"--prompts {path!r} holds no prompts")
    return prompts


# ------------------------------------------------------------------------------------------------ output
class TextStream:
    """Decoded text of a growing token list, handed out as it becomes final.

    `push(ids)` returns the text that the new tokens add; a trailing incomplete UTF-8 sequence (decoded as
    U+FFFD) is held back until later tokens complete it. `finish()` returns the rest, so the pieces always
    concatenate to `tok.decode(all ids, skip_special_tokens=True)`.
    """

    def __init__(self, tok):
        self.tok, self.ids, self.sent = tok, [], ""

    def _text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def push(self, ids) -> str:
        self.ids.extend(int(t) for t in ids)
        text = self._text()
        stable = text.rstrip("\ufffd")
        if not stable.startswith(self.sent) or len(stable) <= len(self.sent):
            return ""
        piece, self.sent = stable[len(self.sent):], stable
        return piece

    def finish(self) -> str:
        text = self._text()
        # decoding is prefix-stable for byte-level BPE; should a tokenizer rewrite earlier text, restart the line
        piece = text[len(self.sent):] if text.startswith(self.sent) else "\n" + text
        self.sent = text
        return piece


class _Pair:
    """A running (count, seconds) sum: `pair += n, s`."""

    def __init__(self):
        self.n, self.s = 0, 0.0

    def __iadd__(self, other):
        self.n, self.s = self.n + other[0], self.s + other[1]
        return self


class _Generator:
    """Everything one invocation decodes with: model, optional draft, tokenizer, settings and counters."""

    def __init__(self, args, cfg, params, tok, draft):
        import jax

        from .ops.sampling import Sampling

        self.args, self.cfg, self.params, self.tok, self.draft = args, cfg, params, tok, draft
        self.template = not args.no_template
        self.eos = _stop_id(tok, cfg, self.template)
        self.sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        self.key = jax.random.key(args.seed)
        self.calls = 0
        self.new_tokens, self.seconds = 0, 0.0
        self.accepted = self.drafted = self.verifier_calls = 0
        self.first_token_s, self.after_first = 0.0, _Pair()

    def _next_key(self):
        import jax

        # the first call uses the seed's key itself, so a one-prompt run equals l2m_jax.generate(key=key(seed))
        key = self.key if self.calls == 0 else jax.random.fold_in(self.key, self.calls)
        self.calls += 1
        return key

    def check(self, ids: list[int], where: str) -> None:
        extra = self.args.k + 1 if self.draft is not None else 0
        _check_fits(self.cfg, len(ids), self.args.max_new_tokens, where, extra)
        if self.draft is not None:
            _check_fits(self.draft[0], len(ids), self.args.max_new_tokens, where + " (for the draft)", extra)

    def batch(self, prompts_ids: list[list[int]]) -> list[list[int]]:
        """New tokens per prompt, in one batched call (plain or speculative)."""
        import l2m_jax

        a, t0 = self.args, time.perf_counter()
        if self.draft is None:
            out = _generate_fn(self.cfg, self.params, prompts_ids, a.max_new_tokens, sampling=self.sampling,
                               eos_id=self.eos, key=self._next_key(), backend=a.backend)
        else:
            out, stats = l2m_jax.speculative_generate((self.cfg, self.params), self.draft, prompts_ids,
                                                      a.max_new_tokens, k=a.k, sampling=self.sampling,
                                                      key=self._next_key(), eos_id=self.eos, backend=a.backend)
            self.accepted += stats.accepted
            self.drafted += stats.drafted
            self.verifier_calls += stats.target_calls
        self._count(sum(map(len, out)), time.perf_counter() - t0)
        return out

    def stream(self, ids: list[int], write) -> list[int]:
        """New tokens for one prompt; their text goes to `write` as it is decoded (speculative: at the end)."""
        from .infer.stream import generate_stream

        if self.draft is not None:
            out = self.batch([ids])[0]
            write(self.tok.decode(out, skip_special_tokens=True))
            return out
        a, t0 = self.args, time.perf_counter()
        text, out, t1 = TextStream(self.tok), [], None
        for chunk in generate_stream(self.cfg, self.params, [ids], a.max_new_tokens, sampling=self.sampling,
                                     eos_id=self.eos, key=self._next_key(), backend=a.backend,
                                     chunk=a.stream_chunk):
            t1 = time.perf_counter() if t1 is None else t1
            out += chunk[0]
            write(text.push(chunk[0]))
        write(text.finish())
        t2 = time.perf_counter()
        self._count(len(out), t2 - t0)
        self.first_token_s += t1 - t0
        self.after_first += len(out) - 1, t2 - t1
        return out

    def _count(self, n: int, seconds: float) -> None:
        self.new_tokens += n
        self.seconds += seconds

    def report(self) -> str:
        rate = self.new_tokens / max(self.seconds, 1e-9)
        line = f"{self.new_tokens} new tokens in {self.seconds:.2f} s: {rate:.1f} tokens/s"
        n, t = self.after_first.n, self.after_first.s
        if n > 0 and t > 0:
            line += f" (first token after {self.first_token_s:.2f} s, then {n / t:.1f} tokens/s)"
        line += "; first calls include compilation"
        if self.draft is not None:
            acc = self.accepted / max(self.drafted, 1)
            per_call = 1 + self.args.k * acc
            line += (f"; speculative k={self.args.k}: acceptance rate {acc:.3f}, {per_call:.2f} tokens per "
                     f"verifier call ({self.verifier_calls} calls)")
        return line

    def finished(self, out: list[int]) -> bool:
        return self.eos is not None and bool(out) and out[-1] == self.eos


def _write_stdout(piece: str) -> None:
    if piece:
        sys.stdout.write(piece)
        sys.stdout.flush()


def _run_file(g: _Generator, path: str) -> None:
    prompts = _read_prompts(path)
    ids = []
    for i, p in enumerate(prompts):
        ids.append(encode_prompt(g.tok, p, template=g.template, system=g.args.system))
        g.check(ids[-1], f"prompt {i + 1} of {path}")
    out_f = open(g.args.output, "w", encoding="utf-8") if g.args.output else sys.stdout
    try:
        b = g.args.batch_size
        for s in range(0, len(prompts), b):
            for p, new in zip(prompts[s:s + b], g.batch(ids[s:s + b])):
                row = {"prompt": p, "response": g.tok.decode(new, skip_special_tokens=True), "tokens": new,
                       "finished": g.finished(new)}
                out_f.write(json.dumps(row, ensure_ascii=False) + "\n")
            out_f.flush()
    finally:
        if out_f is not sys.stdout:
            out_f.close()


def _run_chat(g: _Generator, first: str | None) -> None:
    history: list[dict] = [{"role": "system", "content": g.args.system}] if g.args.system else []
    keep = len(history)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message; /reset forgets the conversation, /exit (or Ctrl-D) ends it", file=sys.stderr)

    def lines():
        if first is not None:
            yield first
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                return
            yield line.rstrip("\n")

    for line in lines():
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            del history[keep:]
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        while True:
            ids = encode_prompt(g.tok, history, template=True)
            try:
                g.check(ids, "the conversation")
                break
            except UsageError as e:
                if len(history) - keep <= 1:             # the new message alone does not fit
                    print(f"error: {e}", file=sys.stderr)
                    history.pop()
                    ids = None
                    break
                del history[keep:keep + 2]               # forget the oldest exchange
                print("(the conversation outgrew the context: forgot the oldest exchange)", file=sys.stderr)
        if ids is None:
            continue
        out = g.stream(ids, _write_stdout)
        _write_stdout("\n")
        history.append({"role": "assistant", "content": g.tok.decode(out, skip_special_tokens=True).strip()})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m l2m_jax.generate", description=__doc__.split("\nImporting")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="l2m/MiL/HF directory, .gguf file, or 'smollm2'")
    p.add_argument("--tokenizer", help="tokenizer source if none is saved beside the model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt (streamed to stdout); with --chat, the first user message")
    src.add_argument("--prompts", metavar="FILE.jsonl", help="a file of prompts, one JSON per line")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin")
    p.add_argument("--system", help="a system message put before the conversation")
    p.add_argument("--no-template", action="store_true", help="encode prompts as plain text, no chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (runs with one seed are reproducible)")
    p.add_argument("--draft", metavar="DIR", help="a draft model sharing the tokenizer: speculative decoding")
    p.add_argument("--k", type=int, default=4, help="draft tokens per verifier call (with --draft)")
    p.add_argument("--backend", default="xla", choices=["xla", "pallas", "triton"], help="SSM decode kernels")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (with --prompts)")
    p.add_argument("--output", metavar="FILE.jsonl", help="where --prompts results go (default: stdout)")
    p.add_argument("--stream-chunk", type=int, default=4, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import l2m_jax

    try:
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size {args.batch_size} must be >= 1")
        if args.k < 1:
            raise UsageError(f"--k {args.k} must be >= 1")
        if args.prompts and args.chat:
            raise UsageError("--chat reads its prompts from stdin; drop --prompts (or --chat)")
        if args.chat and args.no_template:
            raise UsageError("--chat needs the chat template; drop --no-template")
        if args.prompt is None and args.prompts is None and not args.chat:
            raise UsageError("nothing to do: pass --prompt TEXT, --prompts FILE.jsonl or --chat")
        if args.output and not args.prompts:
            raise UsageError("--output is for --prompts FILE.jsonl results")
        _check_model_path(args.model)
        tok = resolve_tokenizer(args.model, args.tokenizer)
        cfg, params = l2m_jax.load(args.model)
        if len(tok) > cfg.vocab_size:
            raise UsageError(f"the tokenizer has {len(tok)} tokens but the model's vocabulary is {cfg.vocab_size}: "
                             "they do not belong together; pass the model's own tokenizer (--tokenizer)")
        draft = _load_draft(args.draft, cfg, tok, args.tokenizer) if args.draft else None
        g = _Generator(args, cfg, params, tok, draft)
        if args.chat:
            _run_chat(g, args.prompt)
        elif args.prompts:
            _run_file(g, args.prompts)
        else:
            ids = encode_prompt(tok, args.prompt, template=g.template, system=args.system)
            g.check(ids, "the prompt")
            g.stream(ids, _write_stdout)
            _write_stdout("\n")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from e
    print(g.report(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
