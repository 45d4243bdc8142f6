"""The report's plots: a grid's validation curves, loss by position and, on a mention corpus, loss on names by
distance to their previous mention (from MLflow), and an evaluation's bits/token against the budget. matplotlib is imported inside each plotting function: a report without
plots, and every command that never draws, starts without it."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, List, Sequence

from lrexp.tracking.names import FINAL_MENTION_PREFIX, FINAL_POS_PREFIX, VAL_BPT

if TYPE_CHECKING:
    from lrexp.report.collect import GroupRow


FIRST_MENTION = "first"  # lrexp.lit.metrics.MENTION_FIRST: first mentions, drawn before every distance


def _bucket_low(label: str) -> int:
    """"64-256" -> 64, "1024" -> 1024: buckets sort by where they start (first mentions before all)."""
    return -1 if label == FIRST_MENTION else int(label.split("-")[0])


def _bucket_text(label: str) -> str:
    """A bucket without an upper end is the open last one."""
    return label if "-" in label or label == FIRST_MENTION else f"{label}+"


def plot_val_curves(client, rows: List[GroupRow], path: Path) -> bool:
    """Validation bits/token against the step, one colour per group (its seeds share it)."""
    from matplotlib.figure import Figure  # a slow import, paid only when a plot is drawn

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    drawn = False
    for i, r in enumerate(rows):
        for j, c in enumerate(r.finished):
            history = sorted(client.get_metric_history(c.run_id, VAL_BPT), key=lambda m: (m.step, m.timestamp))
            if not history:
                continue
            steps = {m.step: m.value for m in history}  # a step validated twice keeps its latest value
            ax.plot(list(steps), list(steps.values()), color=f"C{i % 10}", marker=".",
                    label=f"{r.group}: a line per seed ({len(r.finished)})" if j == 0 else None)
            drawn = True
    if not drawn:
        return False
    _finish_plot(fig, ax, "optimiser step", path)
    return True


def _finish_plot(fig, ax, xlabel: str, path: Path) -> None:
    """Both plots share the y axis (validation bits/token), grid, legend and file format."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation bits/token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_loss_by_position(rows: List[GroupRow], path: Path) -> bool:
    """Final validation bits/token per bucket of position in the document: the mean over seeds, and a band
    from the lowest to the highest seed, labelled so in the legend."""
    return _plot_buckets(rows, FINAL_POS_PREFIX, "position of the target token in its document (tokens)", path)


def plot_loss_by_mention_distance(rows: List[GroupRow], path: Path) -> bool:
    """Final validation bits/token on the tokens of names, by distance to the name's previous mention, first
    mentions leftmost (what a model that cannot see the earlier text scores); mention corpora only."""
    return _plot_buckets(rows, FINAL_MENTION_PREFIX, "tokens back to the previous mention of the name", path)


def _plot_buckets(rows: List[GroupRow], prefix: str, xlabel: str, path: Path) -> bool:
    """Final metrics `prefix<bucket>` per bucket: the mean over seeds, and a band from the lowest to the
    highest seed."""
    from matplotlib.figure import Figure  # a slow import, paid only when a plot is drawn

    labels = sorted(
        {k[len(prefix):] for r in rows for c in r.finished for k in c.metrics if k.startswith(prefix)},
        key=_bucket_low,
    )
    if not labels:
        return False
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for i, r in enumerate(rows):
        values = [[c.metrics[prefix + b] for c in r.finished if prefix + b in c.metrics] for b in labels]
        xs = [x for x, v in enumerate(values) if v]
        if not xs:
            continue
        color = f"C{i % 10}"
        seeds = max(len(values[x]) for x in xs)
        ax.plot(xs, [statistics.fmean(values[x]) for x in xs], color=color, marker="o",
                label=f"{r.group}: mean of {seeds} seed{'s' if seeds > 1 else ''}")
        if seeds > 1:  # the band is the seeds' range, not an interval: it says how far apart single seeds land
            ax.fill_between(xs, [min(values[x]) for x in xs], [max(values[x]) for x in xs], color=color, alpha=0.2,
                            label=f"{r.group}: min–max over its seeds")
    ax.set_xticks(range(len(labels)), [_bucket_text(b) for b in labels])
    _finish_plot(fig, ax, xlabel, path)
    return True


def plot_bits_vs_budget(results: Sequence, context: int, path: Path) -> bool:
    """bits/token against the budget, one line per policy, the topline dashed: over every target (left) and
    beyond the budget, as the gap to the topline (right)."""
    from matplotlib.figure import Figure  # a slow import, paid only when a plot is drawn

    top = results[0]
    policies = [n for n in dict.fromkeys(r.policy.name for r in results) if n != "full"]
    if not policies:
        return False
    fig = Figure(figsize=(11, 4.5))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, name in enumerate(policies):
        mine = sorted((r for r in results if r.policy.name == name), key=lambda r: r.policy.budget)
        xs = [r.policy.budget for r in mine]
        left.plot(xs, [r.stats["bits_per_token"] for r in mine], marker="o", color=f"C{i}", label=name)
        right.plot(xs, [r.gaps.get("beyond", float("nan")) for r in mine], marker="o", color=f"C{i}", label=name)
    left.axhline(top.stats["bits_per_token"], color="k", ls="--", lw=1, label=f"full (T = {context})")
    right.axhline(0.0, color="k", ls="--", lw=1, label="full")
    for ax, ylabel in ((left, "bits/token, every target"), (right, "Δ bits/token beyond C (minus full)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget C (real rows per layer)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
