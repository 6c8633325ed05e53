"""Run reports: loss-curve plots (PNG, matplotlib's Agg canvas) and a markdown summary with the evaluation table.

    history = read_metrics("run/stages/sft-mamba50/logs/metrics.jsonl")
    plot_stage("sft-mamba50", history, "run/plots/sft-mamba50.png")
    write_report("run", title=..., rows=[ReportRow(...), ...], plots=[...], notes=[...])

Plots are drawn on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so no global backend
is touched and nothing needs a display.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

from l2m_jax.train import metrics_file

# metrics drawn when present, in this order: the losses and, for DPO, what the loss is made of
CURVES = ("loss", "ce", "kl", "reward_margin", "reward_accuracy")


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """The per-step metrics of a Trainer's `metrics.jsonl`, one dict per step in step order.

    A step logged twice (a run killed after logging but before its checkpoint, then resumed) keeps its last
    record. A missing file gives an empty list. A torn last line (a kill mid-write) is left out with a warning;
    a bad line before it raises `MetricsFileError` naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records, end = metrics_file.parse(path, data)
    if end < len(data):
        warnings.warn(f"{path}: ignoring its last line, cut off mid-write ({len(data) - end} bytes; a run "
                      "killed while logging); resuming the run logs that step again", stacklevel=2)
    by_step = {int(r["step"]): r for r in records if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def _smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def _figure(n_panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * n_panels, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def plot_stage(name: str, history: Sequence[dict[str, float]], path: str | os.PathLike) -> list[str]:
    """One PNG with a panel per metric of `CURVES` present in `history` (raw and smoothed); returns them."""
    keys = [k for k in CURVES if any(k in h for h in history)]
    if not keys:
        raise ValueError(f"{name}: no metrics among {CURVES} to plot (is the metrics file empty?)")
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        pts = [(h["step"], h[key]) for h in history if key in h and math.isfinite(h[key])]
        steps, vals = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(steps, vals, color="tab:blue", alpha=0.35, linewidth=1, label="per step")
        ax.plot(steps, _smooth(vals), color="tab:blue", linewidth=2, label="smoothed")
        ax.set_title(f"{name}: {key}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return keys


def plot_overview(histories: dict[str, Sequence[dict[str, float]]], path: str | os.PathLike) -> None:
    """Every stage's loss on one axis of cumulative steps, stages in order (their scales differ: log y)."""
    fig, (ax,) = _figure(1)
    fig.set_size_inches(9, 3.6)
    offset = 0
    for name, history in histories.items():
        pts = [(h["step"], h["loss"]) for h in history if "loss" in h and math.isfinite(h["loss"])]
        if not pts:
            continue
        steps = [offset + s for s, _ in pts]
        ax.plot(steps, _smooth([v for _, v in pts]), linewidth=2, label=name)
        offset = steps[-1]
        ax.axvline(offset, color="grey", linewidth=0.5)
    if all(h.get("loss", 1.0) > 0 for hs in histories.values() for h in hs):
        ax.set_yscale("log")
    ax.set_xlabel("step (all stages)")
    ax.set_ylabel("loss (smoothed)")
    ax.set_title("training loss per stage")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def context_ratio(evaluation: dict, teacher: dict) -> dict[str, float] | None:
    """{context-length group: perplexity over the teacher's} from two evaluations of one text with
    "context_nll" (`eval.heldout.score_texts`); None where either lacks it (one kept from before it was
    recorded)."""
    mine, theirs = evaluation.get("context_nll"), teacher.get("context_nll")
    if not mine or not theirs:
        return None
    return {g: math.exp(mine[g] - theirs[g]) for g in theirs if g in mine}


PER_TOKEN = ("token_nll", "token_entropy")   # an evaluation's per-token lists: kept in eval/*.json, not in summaries


def drop_per_token(evaluation: dict) -> dict:
    """`evaluation` without its `PER_TOKEN` lists (in place), once the grouped ratios are taken from them."""
    for key in PER_TOKEN:
        evaluation.pop(key, None)
    return evaluation


def confidence_ratio(evaluation: dict, teacher: dict) -> dict[str, float] | None:
    """{teacher-confidence group: perplexity over the teacher's on those tokens} from two evaluations of one text
    with "token_nll", the teacher's with "token_entropy" too (`eval.heldout.confidence_groups`: the positions
    grouped by the teacher's predictive entropy there); None where one lacks them or their tokens differ."""
    import numpy as np

    from l2m_jax.eval.heldout import confidence_groups

    mine, theirs, entropy = evaluation.get("token_nll"), teacher.get("token_nll"), teacher.get("token_entropy")
    if mine is None or theirs is None or entropy is None or not len(theirs) \
            or not len(mine) == len(theirs) == len(entropy):
        return None
    mine, theirs = np.asarray(mine, np.float64), np.asarray(theirs, np.float64)
    return {g: math.exp(mine[m].mean() - theirs[m].mean()) for g, m in confidence_groups(entropy).items() if m.any()}


def confidence_shares(teacher: dict) -> dict[str, float]:
    """{teacher-confidence group: share of the text's scored tokens in it}."""
    from l2m_jax.eval.heldout import confidence_groups

    entropy = teacher.get("token_entropy")
    if not entropy:
        return {}
    return {g: float(m.mean()) for g, m in confidence_groups(entropy).items()}


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One model in the evaluation table."""
    name: str
    kind: str                   # "teacher", "init", "stage0", "stage1", "sft", "dpo"
    attn_layers: int
    n_layers: int
    steps: int | None           # optimizer updates of the stage (None for teacher / init)
    final_loss: float | None    # mean loss of the stage's last few steps
    evals: dict                 # held-out text -> {"perplexity", "agreement" (None for the teacher), "tokens"}
    wall_s: float | None = None
    tokens_per_s: float | None = None   # median training throughput of the stage
    peak_bytes: int | None = None       # device memory high-water mark after the stage (GPUs)
    copy_nll: float | None = None       # in-context recall: NLL on the second copy of repeated random tokens

    def ratio(self, text: str, teacher: "ReportRow") -> float:
        """Perplexity over the teacher's on one held-out text."""
        return self.evals[text]["perplexity"] / teacher.evals[text]["perplexity"]

    def context_ratio(self, text: str, teacher: "ReportRow") -> dict[str, float] | None:
        """{context-length group: perplexity over the teacher's} on one held-out text (`context_ratio`)."""
        return context_ratio(self.evals[text], teacher.evals[text])

    def confidence_ratio(self, text: str, teacher: "ReportRow") -> dict[str, float] | None:
        """{teacher-confidence group: perplexity over the teacher's} on one held-out text (`confidence_ratio`)."""
        return confidence_ratio(self.evals[text], teacher.evals[text])


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(rows: Sequence[ReportRow]) -> str:
    """The evaluation table in GitHub markdown: per held-out text perplexity, ratio to the teacher, agreement."""
    teacher = rows[0]
    texts = list(teacher.evals)
    head = ["model", "stage", "attention layers", "steps", "final loss"]
    for t in texts:
        head += [f"{t} ppl", f"{t} ppl / teacher", f"{t} top-1 agreement"]
    head += ["copy NLL", "tokens/s", "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, r.kind, f"{r.attn_layers}/{r.n_layers}", _fmt(r.steps, "d"), _fmt(r.final_loss, ".4f")]
        for t in texts:
            e = r.evals[t]
            agreement = e.get("agreement")
            cells += [f"{e['perplexity']:.3f}", f"{r.ratio(t, teacher):.3f}",
                      "–" if agreement is None else f"{100 * agreement:.1f}%"]
        cells += [_fmt(r.copy_nll, ".3f"), _fmt(r.tokens_per_s, ".0f"), _fmt(r.wall_s, ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _grouped_table(rows: Sequence[ReportRow], title: str, intro: str, groups: dict[str, dict[str, str]],
                   ratio: str) -> str:
    """A markdown section of each model's ratio per held-out text and group: `groups` {text: {group: column
    label}}, `ratio` the ReportRow method giving {group: ratio}; "" without groups."""
    if not groups:
        return ""
    teacher = rows[0]
    head = ["model"] + [f"{t} {label}" for t, g in groups.items() for label in g.values()]
    lines = [f"## {title}", "", intro, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows[1:]:
        cells = [r.name]
        for t, g in groups.items():
            ratios = getattr(r, ratio)(t, teacher) or {}
            cells += [_fmt(ratios.get(k), ".3f") for k in g]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def context_table(rows: Sequence[ReportRow]) -> str:
    """A markdown section: each model's perplexity ratio to the teacher by context length within the evaluation
    window (`eval.heldout.CONTEXT_EDGES`), per held-out text; "" when no evaluation recorded it."""
    evals = rows[0].evals
    groups = {t: {g: g for g in e["context_nll"]} for t, e in evals.items() if e.get("context_nll")}
    return _grouped_table(rows, "Perplexity ratio by context length",
                          "Each held-out token's context is the tokens before it in its evaluation window; a ratio "
                          "that grows with the context means the model loses most in using what came before.",
                          groups, "context_ratio")


def confidence_table(rows: Sequence[ReportRow]) -> str:
    """A markdown section: each model's perplexity ratio to the teacher on the tokens grouped by the teacher's
    predictive entropy at their position (`eval.heldout.CONFIDENCE_EDGES`), per held-out text; "" when no
    evaluation recorded it."""
    evals = rows[0].evals
    groups = {t: {g: f"{g} ({100 * share:.0f}%)" for g, share in confidence_shares(e).items()}
              for t, e in evals.items() if e.get("token_entropy")}
    return _grouped_table(rows, "Perplexity ratio by the teacher's confidence",
                          "The held-out tokens grouped by the entropy of the teacher's prediction of them, in nats "
                          "(the share of each text's tokens in brackets): how sure the teacher was before the token "
                          "came, which favours neither model. A ratio that is highest where the teacher is near "
                          "certain means the model loses most on what the teacher knows by heart.",
                          groups, "confidence_ratio")


def report_json(rows: Sequence[ReportRow], **extra) -> dict:
    """Every number of the table (ratios included) as plain JSON, plus `extra` sections."""
    teacher = rows[0]
    models = []
    for r in rows:
        d = dataclasses.asdict(r)
        d["ratio"] = {t: r.ratio(t, teacher) for t in r.evals}
        d["context_ratio"] = {t: r.context_ratio(t, teacher) for t in r.evals}
        d["confidence_ratio"] = {t: r.confidence_ratio(t, teacher) for t in r.evals}
        for e in d["evals"].values():          # per-token numbers stay in the run's eval/*.json
            drop_per_token(e)
        models.append(d)
    return {"models": models, **extra}


def final_loss(history: Sequence[dict[str, float]], last: int = 5) -> float | None:
    """Mean loss over the last `last` steps (the per-step loss is noisy), or None without steps."""
    values = [h["loss"] for h in history[-last:] if "loss" in h]
    return sum(values) / len(values) if values else None


def write_report(out_dir: str | os.PathLike, *, title: str, rows: Sequence[ReportRow],
                 plots: Sequence[tuple[str, str]], notes: Sequence[str] = (), sections: Sequence[str] = (),
                 name: str = "report.md") -> Path:
    """Write `out_dir/name`: the title, notes (bullets), the table, extra markdown sections, then each
    (caption, PNG path) plot.

    PNG paths are written relative to `out_dir`, so the folder can be moved or browsed as a whole.
    """
    out_dir = Path(out_dir)
    parts = [f"# {title}", ""]
    if notes:
        parts += [f"- {n}" for n in notes] + [""]
    parts += ["## Evaluation", "",
              "Perplexity on held-out texts that no stage trains on; top-1 agreement is the fraction of their "
              "positions where the model's most likely next token equals the teacher's. Copy NLL: the next-token "
              "loss (nats) on the second copy of repeated random token ids, where only recalling the first copy "
              "helps (`l2m_jax.eval.recall`; lower is better).", "", markdown_table(rows), ""]
    for section in sections:
        parts += [section, ""]
    if plots:
        parts += ["## Loss curves", ""]
        for caption, png in plots:
            rel = os.path.relpath(png, out_dir)
            parts += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    path = out_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, path)
    return path
