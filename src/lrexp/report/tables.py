"""The one table writer: a grid's (or single runs') comparison table and an evaluation's table of settings,
as markdown and CSV.

Both are a header and rows of cells: `table_lines` draws them as a markdown table, `markdown` puts a title
and a paragraph above it, `write_csv` writes the CSV, and `bits` prints a number of bits the same way in
both. The grid's rows are `collect.GroupRow`s; the evaluation's are `eval.passes.Result`s, read by attribute
here, so the report never imports the evaluation (torch) to print one.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from lrexp.config.schema import RunConfig
from lrexp.tracking.names import FINAL_TARGETS

if TYPE_CHECKING:
    from lrexp.report.collect import GroupRow
    from lrexp.report.stats import Delta

Table = Tuple[List[str], List[List[Any]]]  # header, rows of cells


def bits(value: Optional[float], signed: bool = False, std: Optional[float] = None) -> str:
    """Bits (per token, per byte) with three decimals, or four with their spread over seeds: one seed's
    fourth digit means nothing. – when unknown."""
    if value is None or math.isnan(value):
        return "–"
    if std is not None:
        return f"{value:.4f} ± {std:.4f}"
    if signed:  # a difference that rounds to zero reads +0.000, whatever the sign of its float noise
        return f"{value:+.3f}".replace("-0.000", "+0.000")
    return f"{value:.3f}"


def count(value: Optional[float]) -> str:
    """A count with its SI prefix at three digits: 123k, 2.5M."""
    if value is None:
        return "–"
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def table_lines(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def markdown(title: str, paragraph: str, table: Table, tail: Sequence[str] = ()) -> str:
    return "\n".join([f"# {title}", "", paragraph, "", *table_lines(*table), *tail]) + "\n"


def write_csv(path: Path, table: Table) -> None:
    header, rows = table
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# ---- a grid's comparison table ----------------------------------------------------------------------

COLUMNS = ["cell", "row", "N", "W", "step time", "bits/token", "Δ bits/token", "test bits/token", "Δ test bits/token",
           "bits/byte", "targets", "params", "tokens seen", "seeds", "status"]
ANSWER_COLUMN = "answer bits/token"  # after bits/byte, when a cell trained on a probe corpus
STATE_BYTES_COLUMN = "state bytes/lane"  # after params, when a cell logged it (runs before it did not)
UNRESOLVED = "≈ "  # marks a difference whose 95% interval holds 0


def signed(value: float, relative: bool, digits: int = 4) -> str:
    """A difference: bits with a sign, or a relative one in percent."""
    return f"{value:+.1%}" if relative else f"{value:+.{digits}f}"


def delta_text(d: Delta) -> str:
    """The table's cell of a difference: its mean and 95% interval, ≈ when that holds 0."""
    if d.is_reference:
        return "reference"
    s = d.stat
    if s.mean is None:
        return "–"
    if d.interval is None:
        return f"{signed(s.mean, d.relative, 3)} (1 seed: no spread)"
    lo, hi = d.interval
    mark = "" if d.resolved else UNRESOLVED
    return f"{mark}{signed(s.mean, d.relative)} [{signed(lo, d.relative)}, {signed(hi, d.relative)}]"


def per_seed_text(d: Delta) -> str:
    """`seed: difference` for every pair, in seed order."""
    return ", ".join(f"{seed}: {signed(v, d.relative, 3)}" for seed, v in d.per_seed.items())


def verdict(d: Delta) -> str:
    """Whether the seeds resolve the difference; if not, how many would at the same mean and spread."""
    if d.interval is None:
        return "1 seed: no spread"
    if d.resolved:
        return "resolved"
    n = d.seeds_needed
    return f"not resolved; {n} seeds would" if n is not None else "not resolved; over 1,000 seeds would"


def grid_table(rows: List[GroupRow]) -> Table:
    answers = any(r.answer_bits.mean is not None for r in rows)
    state = any(r.state_bytes.mean is not None for r in rows)
    columns = list(COLUMNS)
    if state:
        columns.insert(columns.index("params") + 1, STATE_BYTES_COLUMN)
    if answers:
        columns.insert(columns.index("bits/byte") + 1, ANSWER_COLUMN)

    def stat_bits(stat) -> str:
        return bits(stat.mean, std=stat.std)

    def step_time(r: GroupRow) -> str:
        text = r.step_time_rel.text(2)
        d = r.step_time_delta
        return UNRESOLVED + text if d.resolved is False and not d.is_reference else text

    cells = [[
        f"`{r.group}`", r.row, r.segment_len, r.window, step_time(r), stat_bits(r.bits_per_token),
        delta_text(r.delta), stat_bits(r.test_bits_per_token), delta_text(r.test_delta), stat_bits(r.bits_per_byte),
        *([stat_bits(r.answer_bits)] if answers else []), count(r.targets.mean), count(r.params.mean),
        *([count(r.state_bytes.mean)] if state else []), count(r.tokens_seen.mean), f"{len(r.finished)}/{len(r.cells)}",
        r.status,
    ] for r in rows]
    return columns, cells


def evidence_table(rows: List[GroupRow]) -> Table:
    """Every difference to the reference seed by seed, with its interval and what would resolve it; one line
    per group and metric that has two pairs or more."""
    header = ["cell", "metric", "per seed", "mean", "95% interval", "verdict"]
    lines = []
    for r in rows:
        for metric, d in (("bits/token", r.delta), ("test bits/token", r.test_delta),
                          ("step time", r.step_time_delta)):
            if d.is_reference or d.interval is None:
                continue
            lo, hi = d.interval
            lines.append([f"`{r.group}`", metric, per_seed_text(d), signed(d.stat.mean, d.relative),
                          f"[{signed(lo, d.relative)}, {signed(hi, d.relative)}]", verdict(d)])
    return header, lines


def targets_note(rows: List[GroupRow]) -> str:
    """Whether every finished cell scored the same number of validation targets."""
    counts = {c.metrics.get(FINAL_TARGETS) for r in rows for c in r.finished}
    if counts == {None} or not counts:
        return "No cell logged its scored targets (runs from before the fair final pass)."
    if len(counts) == 1:
        return f"Every cell scored the same {int(counts.pop()):,} validation targets."
    return ("Cells scored different numbers of validation targets (" + ", ".join(
        "–" if c is None else f"{int(c):,}" for c in sorted(counts, key=lambda c: c or 0)) +
        "): their bits are not comparable.")


def grid_markdown(title: str, source: str, rows: List[GroupRow], reference: Optional[str], plots: List[str],
                  expected: Optional[str] = None, missing: Sequence[str] = ()) -> str:
    """`source`: where the runs come from (the parent run, the experiment); `expected`: the grid's cell count;
    `missing`: why each plot that is not drawn is missing, a sentence each."""
    finished = sum(len(r.finished) for r in rows)
    total = sum(len(r.cells) for r in rows)
    ref_row = next((r for r in rows if r.group == reference), None)
    ref_note = (
        f"Step time is the median seconds per optimiser step after warm-up, relative to `{reference}` "
        f"(1.00 = {ref_row.step_time_s.mean:.4g} s)."
        if ref_row is not None
        else "Step time: no finished cell logged one."
    )
    paragraph = (
        f"{source}; {finished} of {total} cell runs finished"
        + (f", {expected} cells in the grid" if expected and int(expected) != total else "")
        + ". " + ref_note + " Seeds of a cell are averaged: mean ± sample std; bits/token and bits/byte are "
        "the final pass over the whole validation split, test bits/token over the test split (lower is better). "
        + targets_note(rows) + " Δ: minus the reference, paired by seed: the mean difference and its 95% t "
        "interval [low, high]; ≈ marks a difference the seeds do not resolve (the interval holds 0; before a "
        "step time: its ratio to the reference's, seed by seed)."
    )
    tail: List[str] = []
    evidence = evidence_table(rows)
    if evidence[1]:
        tail += ["", "## Differences to the reference, seed by seed", "",
                 "Step time as a relative difference (1.10 = +10.0%). Where the interval holds 0: the seeds at "
                 "which the same mean difference and spread would leave it out, the least n with "
                 "t_{0.975, n-1} · s / √n < |mean| (docs/grids.md#differences-and-their-evidence).", "",
                 *table_lines(*evidence)]
    failed = [c for r in rows for c in r.cells if c.status != "FINISHED"]
    if failed:
        tail += ["", "## Cells that did not finish", ""]
        tail += [f"- `{c.cell}` ({c.status}, run `{c.run_id}`): {c.error or 'no error recorded'}" for c in failed]
    if plots:
        tail += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)]
    if missing:
        tail += ["", *missing]
    return markdown(title, paragraph, grid_table(rows), tail)


def _delta_fields(d: Delta) -> List[Any]:
    ci = d.interval
    return [d.stat.mean, d.stat.std, d.stat.n, d.resolved, *(ci if ci else (None, None)), d.seeds_needed,
            " ".join(f"{seed}:{v!r}" for seed, v in d.per_seed.items())]


def _delta_header(prefix: str) -> List[str]:
    return [f"{prefix}{k}" for k in ("", "_std", "_pairs", "_resolved", "_ci_low", "_ci_high", "_seeds_needed",
                                     "_per_seed")]


def grid_csv(rows: List[GroupRow]) -> Table:
    header = [
        "cell", "row", "N", "W", "seeds_finished", "seeds", "status", "step_time_rel", "step_time_rel_std",
        "step_time_s", *_delta_header("delta_step_time_rel"), "bits_per_token", "bits_per_token_std",
        *_delta_header("delta_bits_per_token"), "test_bits_per_token", "test_bits_per_token_std",
        *_delta_header("delta_test_bits_per_token"), "bits_per_byte", "bits_per_byte_std",
        "answer_bits_per_token", "answer_bits_per_token_std", "targets", "params", "state_bytes_per_lane",
        "tokens_seen", "run_ids",
    ]
    return header, [[
        r.group, r.row, r.segment_len, r.window, len(r.finished), len(r.cells), r.status,
        r.step_time_rel.mean, r.step_time_rel.std, r.step_time_s.mean, *_delta_fields(r.step_time_delta),
        r.bits_per_token.mean, r.bits_per_token.std, *_delta_fields(r.delta),
        r.test_bits_per_token.mean, r.test_bits_per_token.std, *_delta_fields(r.test_delta),
        r.bits_per_byte.mean, r.bits_per_byte.std, r.answer_bits.mean, r.answer_bits.std, r.targets.mean,
        r.params.mean, r.state_bytes.mean, r.tokens_seen.mean, " ".join(c.run_id for c in r.cells),
    ] for r in rows]


# ---- an evaluation's table of settings (`lrexp eval`) -----------------------------------------------


def eval_table(results: Sequence, context: int) -> Table:
    """One row per setting (policy, budget C): bits/token over every target and beyond C, each minus `full`'s
    over the same targets, overall and per position bucket, then speed and cache size."""
    buckets = sorted({k for r in results for k in r.gaps if k.startswith("by_pos/")},
                     key=lambda k: int(k.split("/")[1].split("-")[0]))
    names = [b.split("/")[1] if "-" in b else b.split("/")[1] + "+" for b in buckets]
    header = ["policy", "C", "C/T", "bits/token", "Δ full", "beyond C", "Δ beyond C",
              *[f"Δ @{n}" for n in names], "tokens/s", "cache KiB/lane"]
    rows = []
    for r in results:
        c = r.policy.budget
        beyond = r.beyond.get(c, {}).get("bits_per_token") if c is not None else None
        rows.append([r.policy.name, "full" if c is None else str(c), "1" if c is None else f"{c / context:.3g}",
                     bits(r.stats["bits_per_token"]), bits(r.gaps.get("all"), True), bits(beyond),
                     bits(r.gaps.get("beyond"), True), *[bits(r.gaps.get(b), True) for b in buckets],
                     f"{r.tokens_per_s:,.0f}", f"{r.cache_bytes_per_lane / 1024:.1f}"])
    return header, rows


def eval_markdown(cfg: RunConfig, row: str, results: Sequence, info: Dict[str, Any], source: str) -> str:
    """`row`: the evaluated row's name; `info`: what the pass scored (split, targets, docs hash, T_eval, block)."""
    p = cfg.policy
    scope = info.get("scope", "the training's final pass")
    mode = info.get("mode_text") or (
        "token by token" if p.mode == "token" else f"block mode, b = {info['block']} (approximate for h2o, tova)")
    paragraph = (
        f"{source}. Split `{info['split']}`: {info['targets']:,} targets (docs hash `{info['docs_hash']}`), "
        f"{scope}. T_eval = {info['context']}, {mode}; positions {p.positions}; "
        f"{'include' if cfg.model.attn.window_includes_self else 'exclude'}-self mask; sinks i = {p.sinks}; H2O "
        f"h = {'C/2' if p.h2o_heavy is None else p.h2o_heavy}; TOVA score query {p.tova_score_query}; "
        f"protect_first_i {p.protect_first_i}. bits/token over every target; beyond C: over the targets whose "
        f"query sits past position C, where eviction can have acted; Δ: minus `full` over the same targets, "
        f"also per bucket of position since the state was fresh (@lo-hi). Cache: K, V (and scores) per lane."
    )
    return markdown(f"Bounded multi-state evaluation of {row}", paragraph, eval_table(results, info["context"]))


def eval_csv(results: Sequence, metrics: Sequence[Dict[str, float]]) -> Table:
    """`metrics`: each setting's MLflow metrics (`eval.passes.setting_metrics`), one column each."""
    keys = sorted({k for m in metrics for k in m})
    return ["policy", "budget", "granularity", "run_id", *keys], [
        [r.policy.name, r.policy.budget or "full", r.policy.granularity, r.run_id or "", *[m.get(k, "") for k in keys]]
        for r, m in zip(results, metrics)
    ]
