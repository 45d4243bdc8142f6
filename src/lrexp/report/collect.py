"""The comparison table and plots of a grid, from MLflow alone (docs/grids.md#reading-the-table; docs/models.md#step-time, docs/models.md#paper-results-table-1).

The grid's parent run names its children (`mlflow.parentRunId`); each child carries its cell id, group
(the cell id without the seed) and position as tags, and its summary as `final/*` metrics. Per cell the
latest FINISHED run counts (a resumed grid may hold a failed attempt too), else the latest run. Cells
of one group (seeds) are averaged: mean ± sample standard deviation. Step time is the median step time of
a cell (`perf/step_time_s`, after warm-up) divided by that of the reference group: the one the parent
names, else the first trained from the row preset `REFERENCE_ROW` (slide13: Table 1 divides by Slide:13L).

Bits are those of the final passes over the whole validation and test splits, which score the same
targets in every row (the `targets` column shows it). Differences to the reference group (bits/token, test
bits/token, and step time as a ratio) are paired by seed (equal seeds share data order and initialisation)
and summarised by `report.stats`: the per-seed values, their mean, its 95% t interval, and the seeds that
would resolve a difference the interval does not (docs/grids.md#differences-and-their-evidence).

Output under `reports/<grid>/<parent run id>/` (one folder per invocation; `reports/<grid>/latest` points
at the newest): `table.md`, `table.csv`, `val_bits_per_token.png` (validation curves) and
`loss_by_position.png` (final validation bits/token per bucket of position in the document, a band over
seeds), written by `report.tables` and `report.plots`; all are logged as artifacts of the parent run under
`report/`. `build_runs` makes the same table of single runs (`lrexp train`), named by run id or by
experiment, under `reports/runs/<digest>/`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from lrexp.config.load import load
from lrexp.config.paths import PROJECT_ROOT
from lrexp.errors import UserError
from lrexp.report import plots, tables
from lrexp.report.stats import Delta, Stat
from lrexp.tracking.store import tracking_uri
from lrexp.tracking.names import (
    FINAL_ANSWER, FINAL_BPB, FINAL_BPT, FINAL_PARAMS, FINAL_STATE_BYTES, FINAL_STEP_TIME, FINAL_TARGETS,
    FINAL_TEST_BPT, FINAL_TOKENS, REFERENCE_ROW, SEED_KEY, TAG_CELL, TAG_ERROR, TAG_GROUP, TAG_INDEX, TAG_PARENT,
    TAG_REFERENCE, TAG_ROLE, TAG_ROW_PRESET, latest_parent, parents,
)

REPORTS_DIR = PROJECT_ROOT / "reports"


class ReportError(UserError):
    """No grid runs to report on; one line."""


@dataclass
class CellRun:
    cell: str
    group: str
    index: int
    status: str
    run_id: str
    row: str
    segment_len: str
    window: str
    metrics: Dict[str, float]
    error: Optional[str] = None
    seed: Optional[str] = None
    preset: Optional[str] = None  # the row preset it trained from (TAG_ROW_PRESET; runs before it: None)
    params: Dict[str, str] = field(default_factory=dict)  # its MLflow params: the flattened config


@dataclass
class GroupRow:
    group: str
    row: str
    segment_len: str
    window: str
    cells: List[CellRun]
    step_time_s: Stat
    step_time_rel: Stat = field(default_factory=Stat)
    bits_per_token: Stat = field(default_factory=Stat)
    bits_per_byte: Stat = field(default_factory=Stat)
    test_bits_per_token: Stat = field(default_factory=Stat)
    targets: Stat = field(default_factory=Stat)
    delta: Delta = field(default_factory=Delta)  # bits/token minus the reference's, seed by seed
    test_delta: Delta = field(default_factory=Delta)  # test bits/token, the same
    step_time_delta: Delta = field(default_factory=Delta)  # step time over the reference's - 1, the same
    answer_bits: Stat = field(default_factory=Stat)
    params: Stat = field(default_factory=Stat)
    tokens_seen: Stat = field(default_factory=Stat)
    state_bytes: Stat = field(default_factory=Stat)

    @property
    def finished(self) -> List[CellRun]:
        return [c for c in self.cells if c.status == "FINISHED"]

    @property
    def status(self) -> str:
        done, total = len(self.finished), len(self.cells)
        if done == total:
            return "FINISHED"
        states = sorted({c.status for c in self.cells if c.status != "FINISHED"})
        return f"{'/'.join(states)} ({total - done} of {total})"


@dataclass
class Report:
    grid: str
    parent_id: str
    reference: Optional[str]
    rows: List[GroupRow]
    cells: List[CellRun]
    markdown: str
    files: List[Path]


# --------------------------------------------------------------------------------------------------
# Reading MLflow
# --------------------------------------------------------------------------------------------------


def grid_name(name: str) -> str:
    """A grid name, or the stem of a grid file path (the grid command names experiments by the stem)."""
    return Path(name).stem if name.endswith((".yaml", ".yml")) or "/" in name else name


def find_parent(client, name: str, parent_id: Optional[str] = None):
    """The parent run of the grid's latest invocation (or the one asked for)."""
    exp = client.get_experiment_by_name(f"lrexp-{name}")
    if exp is None:
        raise ReportError(
            f"no MLflow experiment 'lrexp-{name}' in {client.tracking_uri}; run `lrexp grid {name}` first"
        )
    if parent_id:
        run = client.get_run(parent_id)
        if run.data.tags.get(TAG_ROLE) != "parent" or run.info.experiment_id != exp.experiment_id:
            raise ReportError(f"run {parent_id} is not a parent run of grid '{name}'")
        return run
    parent = latest_parent(parents(client, exp.experiment_id, name))
    if parent is None:
        raise ReportError(f"experiment 'lrexp-{name}' holds no grid parent run; run `lrexp grid {name}` first")
    return parent


def collect(client, parent) -> List[CellRun]:
    """One run per cell: the latest FINISHED child, else the latest child; in grid order."""
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=10000,
    )
    picked: Dict[str, object] = {}
    for run in children:  # newest first
        cell = run.data.tags.get(TAG_CELL, run.info.run_name)
        have = picked.get(cell)
        if have is None or (have.info.status != "FINISHED" and run.info.status == "FINISHED"):
            picked[cell] = run
    cells = []
    for cell, run in picked.items():
        tags, params = run.data.tags, run.data.params
        cells.append(
            CellRun(
                cell=cell,
                group=tags.get(TAG_GROUP, cell),
                index=int(tags.get(TAG_INDEX, 10**9)),
                status=run.info.status,
                run_id=run.info.run_id,
                row=tags.get("lrexp.row", "–"),
                segment_len=params.get("derived.segment_len", "–"),
                window=params.get("model.window", "–"),
                metrics=dict(run.data.metrics),
                error=tags.get(TAG_ERROR),
                seed=params.get(SEED_KEY),
                preset=tags.get(TAG_ROW_PRESET),
                params=dict(params),
            )
        )
    return sorted(cells, key=lambda c: (c.index, c.cell))


def aggregate(cells: List[CellRun], reference: Optional[str],
              preset: str = REFERENCE_ROW) -> Tuple[List[GroupRow], Optional[str]]:
    """Rows per group in grid order, and the group the step time is relative to.

    The reference is the group `reference` (the parent's); when it has no finished run with a step time,
    the first such group trained from the row preset `preset`, else the first group with one.
    """
    groups: Dict[str, List[CellRun]] = {}
    for c in cells:
        groups.setdefault(c.group, []).append(c)

    def stat(members: List[CellRun], key: str) -> Stat:
        return Stat.of([c.metrics.get(key) for c in members if c.status == "FINISHED"])

    rows = []
    for group, members in groups.items():
        first = members[0]
        row = GroupRow(group, first.row, first.segment_len, first.window, members, stat(members, FINAL_STEP_TIME))
        row.bits_per_token = stat(members, FINAL_BPT)
        row.bits_per_byte = stat(members, FINAL_BPB)
        row.test_bits_per_token = stat(members, FINAL_TEST_BPT)
        row.targets = stat(members, FINAL_TARGETS)
        row.answer_bits = stat(members, FINAL_ANSWER)
        row.params = stat(members, FINAL_PARAMS)
        row.tokens_seen = stat(members, FINAL_TOKENS)
        row.state_bytes = stat(members, FINAL_STATE_BYTES)
        rows.append(row)

    timed = [r for r in rows if r.step_time_s.mean]
    ref = next((r for r in timed if r.group == reference), None)
    ref = ref or next((r for r in timed if r.cells[0].preset == preset), None) or (timed[0] if timed else None)
    for r in rows:
        r.step_time_rel = r.step_time_s.scaled(ref.step_time_s.mean if ref else None)
    ref_bits = next((r for r in rows if r.group == reference), None) or ref
    for key, attr, relative, against in ((FINAL_BPT, "delta", False, ref_bits),
                                         (FINAL_TEST_BPT, "test_delta", False, ref_bits),
                                         (FINAL_STEP_TIME, "step_time_delta", True, ref)):
        if against is None:
            continue
        theirs = _by_seed(against, key)
        for r in rows:
            setattr(r, attr, Delta.paired(_by_seed(r, key), theirs, relative))
            getattr(r, attr).is_reference = r is against
    return rows, (ref.group if ref else None)


def _by_seed(row: GroupRow, key: str) -> Dict[Optional[str], float]:
    """seed -> the metric, over the group's finished cells that logged it."""
    return {c.seed: c.metrics[key] for c in row.finished if key in c.metrics}


def _client(uri: Optional[str]):
    """(an MLflow client, its URI): of `uri`, else of the project's store."""
    from mlflow.tracking import MlflowClient  # MLflow when a report is made, not when `lrexp` starts

    if uri is None:
        uri = tracking_uri(load())
    return MlflowClient(uri), uri


def build(
    name: str, out_dir: Optional[Path] = None, parent_id: Optional[str] = None, uri: Optional[str] = None
) -> Report:
    """Read the grid's runs, write the table and plots, log them on the parent run."""
    client, _ = _client(uri)
    name = grid_name(name)
    parent = find_parent(client, name, parent_id)
    cells = collect(client, parent)
    if not cells:
        raise ReportError(f"parent run {parent.info.run_id} of grid '{name}' has no cell runs yet")
    rows, reference = aggregate(cells, parent.data.tags.get(TAG_REFERENCE))
    source = f"MLflow experiment `lrexp-{name}`, parent run `{parent.info.run_id}` ({parent.info.status})"
    out = Path(out_dir) if out_dir else _invocation_folder(REPORTS_DIR / name, parent.info.run_id)
    text, files = _write(client, rows, reference, out, f"Grid `{name}`", source, parent.data.tags.get("lrexp.cells"))
    for f in files:
        client.log_artifact(parent.info.run_id, str(f), "report")
    return Report(name, parent.info.run_id, reference, rows, cells, text, files)


def _invocation_folder(grid_dir: Path, run_id: str) -> Path:
    """`<grid>/<run id>/`, and `<grid>/latest` pointing at it: an ad-hoc invocation keeps the others'."""
    out = grid_dir / run_id
    out.mkdir(parents=True, exist_ok=True)
    latest = grid_dir / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run_id, target_is_directory=True)
    return out


def _write(client, rows: List[GroupRow], reference: Optional[str], out: Path, title: str, source: str,
           expected: Optional[str] = None) -> Tuple[str, List[Path]]:
    """The plots, table.md and table.csv in `out`; returns the markdown and the files written."""
    out.mkdir(parents=True, exist_ok=True)
    drawn, missing = [], []
    if plots.plot_val_curves(client, rows, out / "val_bits_per_token.png"):
        drawn.append("val_bits_per_token.png")
    else:
        missing.append("No `val_bits_per_token.png`: " + _no_validation_reason(rows))
    if plots.plot_loss_by_position(rows, out / "loss_by_position.png"):
        drawn.append("loss_by_position.png")
    else:
        missing.append("No `loss_by_position.png`: " + (
            "no cell finished." if not any(r.finished for r in rows)
            else "no finished cell logged the final pass's loss by position (`final/val_bits_per_token_by_pos_*`)."))
    if plots.plot_loss_by_mention_distance(rows, out / "loss_by_mention_distance.png"):
        drawn.append("loss_by_mention_distance.png")
    text = tables.grid_markdown(title, source, rows, reference, drawn, expected, missing)
    (out / "table.md").write_text(text)
    tables.write_csv(out / "table.csv", tables.grid_csv(rows))
    return text, [out / "table.md", out / "table.csv", *(out / p for p in drawn)]


def _no_validation_reason(rows: List[GroupRow]) -> str:
    """Why no cell has a validation curve: none finished, or each stopped before its first validation."""
    finished = [c for r in rows for c in r.finished]
    if not finished:
        return "no cell finished."
    steps = sorted({(c.params.get("train.max_steps", ""), c.params.get("train.val_every", "")) for c in finished})
    text = "no finished cell logged `val/bits_per_token` during training"
    if all(m.isdigit() and v.isdigit() and int(m) < int(v) for m, v in steps):
        text += (": validation runs every `train.val_every` steps and the cells stopped before the first ("
                 + ", ".join(f"max_steps {m} < val_every {v}" for m, v in steps) + ")")
    return text + "; the final pass's bits are in the table."


def build_runs(
    run_ids: Sequence[str] = (), experiment: Optional[str] = None, out_dir: Optional[Path] = None,
    uri: Optional[str] = None, reference: Optional[str] = None,
) -> Report:
    """The table of single runs: the given run ids, or every run of `experiment` (its grid parents left
    out), one line per run name (runs of one name with other seeds are averaged). The reference is the
    line named `reference`, else the first trained from the row preset `reference` (default REFERENCE_ROW),
    else the first."""
    client, uri = _client(uri)
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ReportError(f"no MLflow experiment '{experiment}' in {uri}")
        runs = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"],
                                              max_results=10000)
                if r.data.tags.get(TAG_ROLE) != "parent"]
    else:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except Exception:  # mlflow raises its own exception types for an unknown id
                raise ReportError(f"no MLflow run '{run_id}' in {uri}") from None
    if not runs:
        raise ReportError(f"no runs to report in {experiment or 'the given ids'}")
    cells = [
        CellRun(cell=r.info.run_name or r.info.run_id, group=r.info.run_name or r.info.run_id, index=i,
                status=r.info.status, run_id=r.info.run_id, row=r.data.tags.get("lrexp.row", "–"),
                segment_len=r.data.params.get("derived.segment_len", "–"), window=r.data.params.get("model.window", "–"),
                metrics=dict(r.data.metrics), error=r.data.tags.get(TAG_ERROR),
                seed=r.data.params.get(SEED_KEY), preset=r.data.tags.get(TAG_ROW_PRESET),
                params=dict(r.data.params))
        for i, r in enumerate(runs)
    ]
    rows, ref = aggregate(cells, reference, reference or REFERENCE_ROW)
    ids = sorted(c.run_id for c in cells)
    digest = hashlib.sha256(" ".join(ids).encode()).hexdigest()[:12]
    out = Path(out_dir) if out_dir else REPORTS_DIR / "runs" / (experiment or digest)
    title = f"Experiment `{experiment}`" if experiment else f"{len(ids)} runs"
    text, files = _write(client, rows, ref, out, title, f"MLflow store `{uri}`")
    return Report(experiment or "runs", "", ref, rows, cells, text, files)
