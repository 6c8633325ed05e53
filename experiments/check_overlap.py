"""Which training rows share a span with reference texts: the check a held-out number needs beyond decontamination.

    python -m experiments.check_overlap --rows RUN/teacher_text/rows.npz --ref kjv.txt austen/ [--n 13 8]
        [--tokenizer smollm2] [--examples 3] [--json OUT.json]

The recipe drops every training row that shares a data.decontaminate-token span with the held-out excerpts
themselves. Rows the teacher writes (data.mix.teacher_text) can also recite, from the teacher's memory, other
parts of the books the held-out excerpts come from (the rest of the KJV, Austen's other chapters and novels);
training on those would favour the held-out text's author or style without sharing a span with it. This
command counts, for each reference file (or each .txt file of a folder), the rows that share an n-token span
with it, for every n asked, prints a few of them decoded, and writes the counts to --json.

--rows is an .npz with a "tokens" int array [rows, L] (what `cached_teacher_text_rows` keeps), a .jsonl of
{"text": ...} lines, or a .txt whose blank-line separated documents are the rows; references are plain UTF-8
text, tokenised whole with the same tokenizer.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from l2m_jax.recipe.config import UsageError

__all__ = ["overlap_counts", "main"]


def overlap_counts(rows: list[np.ndarray], references: dict[str, np.ndarray], ns: list[int]) -> dict:
    """{ref name: {n: bool [len(rows)]}}: which rows share an n-token span with each reference."""
    from l2m_jax.data.text import ngram_overlap

    return {name: {n: ngram_overlap(rows, [ref], n) for n in ns} for name, ref in references.items()}


def _read_rows(path: Path, tok) -> list[np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path) as f:
            if "tokens" not in f:
                raise UsageError(f"{path}: no 'tokens' array (it holds {sorted(f.files)})")
            return [np.asarray(r, np.int64) for r in f["tokens"]]
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UsageError(f"{path}:{i + 1}: not a JSON object with a 'text' field") from None
                out.append(np.asarray(tok.encode(text, add_special_tokens=False), np.int64))
        return out
    if path.suffix == ".txt":                      # a text source: one row per document (blank-line separated)
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
        return [np.asarray(tok.encode(d, add_special_tokens=False), np.int64) for d in docs if d]
    raise UsageError(f"--rows {path}: expected an .npz with a 'tokens' array, a .jsonl of {{'text': ...}} lines "
                     "or a .txt (one row per blank-line separated document)")


def _references(specs: list[str]) -> dict[str, Path]:
    refs: dict[str, Path] = {}
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            files = sorted(p.glob("*.txt"))
            if not files:
                raise UsageError(f"--ref {spec}: a folder without .txt files")
            refs.update({f.stem: f for f in files})
        elif p.is_file():
            refs[p.stem] = p
        else:
            raise UsageError(f"--ref {spec}: no such file or folder")
    return refs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", required=True, type=Path,
                    help="rows.npz (tokens), .jsonl ({'text': ...} lines) or .txt (documents)")
    ap.add_argument("--ref", required=True, nargs="+", help="reference .txt files or folders of them")
    ap.add_argument("--n", type=int, nargs="+", default=[13], help="span lengths in tokens (default 13)")
    ap.add_argument("--tokenizer", default="smollm2", help="tokenizer source (a model folder, .gguf or 'smollm2')")
    ap.add_argument("--examples", type=int, default=3, help="rows to print decoded per reference (longest n)")
    ap.add_argument("--json", type=Path, default=None, help="write the counts here")
    a = ap.parse_args(argv)
    if any(n < 4 for n in a.n):
        ap.error(f"--n {a.n}: spans shorter than 4 tokens match common phrases; use n >= 4")
    try:
        import l2m_jax

        tok = l2m_jax.load_tokenizer(a.tokenizer)
        rows = _read_rows(a.rows, tok)
        refs = {name: np.asarray(tok.encode(p.read_text(encoding="utf-8"), add_special_tokens=False), np.int64)
                for name, p in _references(a.ref).items()}
    except UsageError as e:
        print(f"check_overlap: error: {e}", file=sys.stderr)
        return 2
    ns = sorted(set(a.n))
    hits = overlap_counts(rows, refs, ns)
    result = {"rows": str(a.rows), "n_rows": len(rows), "ns": ns,
              "references": {name: {"tokens": int(refs[name].size),
                                    **{f"rows_sharing_{n}": int(h[n].sum()) for n in ns}}
                             for name, h in hits.items()}}
    any_hit = {n: np.zeros(len(rows), bool) for n in ns}
    for h in hits.values():
        for n in ns:
            any_hit[n] |= h[n]
    result["any"] = {f"rows_sharing_{n}": int(any_hit[n].sum()) for n in ns}
    print(f"{len(rows)} rows of {a.rows}; rows sharing an n-token span with each reference:")
    print("| reference | tokens | " + " | ".join(f"n={n}" for n in ns) + " |")
    print("|---|---|" + "---|" * len(ns))
    for name, r in result["references"].items():
        print(f"| {name} | {r['tokens']:,} | " + " | ".join(f"{r[f'rows_sharing_{n}']}" for n in ns) + " |")
    print("| any | | " + " | ".join(f"{result['any'][f'rows_sharing_{n}']}" for n in ns) + " |")
    for name, h in hits.items():
        for i in np.flatnonzero(h[ns[-1]])[:a.examples]:
            text = tok.decode([int(t) for t in rows[i]]).replace("\n", " ")
            print(f"  {name} row {i}: {text[:300]!r}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
