"""`lrexp eval`: a trained row evaluated from its checkpoint as a bounded multi-state RNN
(docs/cache-policies.md#evaluation-protocol): every KV-cache policy x budget over the same scored targets as the training's final pass
(`eval.load` reads the checkpoint, `eval.passes` decodes and scores, `report.tables` and `report.plots` write
the table and the plot).

MLflow: one parent run per evaluation (tag `lrexp.role=eval`, `lrexp.checkpoint_run` = the training run),
a child per setting with the policy's knobs as params. The table (markdown + CSV) and a plot of bits/token
against the budget, one line per policy, go to `reports/eval/<parent run id>/` (or `--out`) and onto the
parent run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from lrexp.config.paths import PROJECT_ROOT
from lrexp.config.schema import RunConfig
from lrexp.errors import Interrupted, UserError
from lrexp.eval.load import EvalError, load
from lrexp.eval.passes import Result, describe, evaluate, setting_metrics, setting_params, settings, stream
from lrexp.lit import checkpoint as ckpt_mod
from lrexp.model.variants import row_name
from lrexp.report import plots, tables
from lrexp.runtime.signals import StopSignals
from lrexp.runtime.signals import name as signal_name
from lrexp.tracking import runs
from lrexp.tracking.names import (
    TAG_CELL, TAG_CHECKPOINT_RUN, TAG_GIT_SHA, TAG_GRID, TAG_GRID_PARENT, TAG_PARENT, TAG_ROLE, TAG_ROW, TAG_SCALE,
)
from lrexp.tracking.store import TrackingError, experiment_id, tracking_uri
from lrexp.train.run import cpu_threads

REPORTS_DIR = PROJECT_ROOT / "reports" / "eval"
SPLITS = {"test": "test", "validation": "validation", "val": "validation", "train": "train"}


class EvalTracker:
    """The evaluation's MLflow runs: the parent (RUNNING while it evaluates) and a child per setting, opened
    and ended by the one run writer (tracking/runs.py)."""

    def __init__(self, cfg: RunConfig, info: Dict[str, Any], checkpoint_run: Optional[str],
                 tags: Dict[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        self.cfg, self.info = cfg, info
        uri = tracking_uri(cfg)
        try:
            self.client = MlflowClient(uri)
            self.experiment = experiment_id(self.client, cfg.log.experiment, uri)
        except Exception as exc:
            raise TrackingError(f"cannot open the MLflow tracking store {uri}: {exc}") from None
        # not the checkpoint's log.tags: a grid cell's hold its grid parent, which this run is no child of
        self.tags = {TAG_ROW: row_name(cfg), TAG_SCALE: cfg.scale.name, TAG_GIT_SHA: runs.git_sha(),
                     TAG_CHECKPOINT_RUN: str(checkpoint_run), "lrexp.eval.targets": str(info["targets"]),
                     "lrexp.eval.docs_hash": info["docs_hash"],
                     "lrexp.eval.limit": "all" if info["limit"] is None else str(info["limit"]), **tags}
        self.parent = runs.open_run(self.client, self.experiment, f"eval:{row_name(cfg)}:{str(checkpoint_run)[:8]}",
                                    {**self.tags, TAG_ROLE: "eval"})
        p = cfg.policy
        for key, value in {"policies": ",".join(p.names), "budgets": ",".join(map(str, p.budgets)),
                           "mode": p.mode, "block": info["block"], "context": info["context"],
                           "split": info["split"], "limit": "all" if info["limit"] is None else info["limit"],
                           "decoded": info.get("mode_text", "")}.items():
            self.client.log_param(self.parent, key, str(value))

    def log_setting(self, r: Result) -> None:
        run_id = runs.open_run(self.client, self.experiment, r.policy.label(),
                               {**self.tags, TAG_PARENT: self.parent, TAG_ROLE: "eval-setting"})
        for key, value in setting_params(self.cfg, r.policy, self.info).items():
            self.client.log_param(run_id, key, value)
        for key, value in setting_metrics(r).items():
            self.client.log_metric(run_id, key, value)
        self.client.log_dict(run_id, {str(d): {"nll": v[0], "targets": v[1]} for d, v in sorted(r.per_document.items())},
                             "per_document_nll.json")
        runs.finish(self.client, run_id)
        r.run_id = run_id

    def finish(self, files: Sequence[Path]) -> None:
        for path in files:
            self.client.log_artifact(self.parent, str(path), "report")
        runs.finish(self.client, self.parent)

    def fail(self, exc: BaseException) -> None:
        runs.end_on_error(self.client, self.parent, exc)


def write_report(cfg: RunConfig, results: List[Result], info: Dict[str, Any], out: Path, source: str) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(tables.eval_markdown(cfg, row_name(cfg), results, info, source))
    tables.write_csv(out / "table.csv", tables.eval_csv(results, [setting_metrics(r) for r in results]))
    files = [out / "table.md", out / "table.csv"]
    if plots.plot_bits_vs_budget(results, info["context"], out / "bits_vs_budget.png"):
        files.append(out / "bits_vs_budget.png")
    return files


def run(checkpoint: str, overrides: Sequence[str] = (), out: Optional[Path] = None,
        tags: Optional[Dict[str, str]] = None, say=print) -> Tuple[str, List[Result], Path]:
    """The whole `lrexp eval`: everything checked first (checkpoint, row, policies, budgets, split), then
    evaluated, logged and reported; returns (the MLflow parent run id, the results, the report folder)."""
    cfg, model, info = load(checkpoint, overrides)
    split = SPLITS.get(cfg.policy.split)
    if split is None:
        raise EvalError(f"unknown split '{cfg.policy.split}'; use one of {', '.join(sorted(SPLITS))}")
    policies = settings(cfg)
    dm, scored = stream(cfg, split)
    scored.update(describe(cfg, policies, scored))
    torch.set_num_threads(cpu_threads(cfg))
    tracker = EvalTracker(cfg, scored, info.run_id, tags or {})
    say(f"lrexp eval: {len(policies)} settings of {info.path} over split {split} ({scored['targets']:,} targets"
        f"{'' if cfg.policy.limit is None else ', --limit'}), MLflow experiment {cfg.log.experiment}, parent run "
        f"{tracker.parent}; {scored['mode_text']}")
    whole = [p.label() for p in policies if p.budget is not None and p.budget >= scored["context"]]
    if whole:
        say(f"lrexp eval: warning: {', '.join(whole)}: a budget at or above the context T_eval = "
            f"{scored['context']} keeps every row, the same setting as full")

    def progress(r: Result) -> None:
        tracker.log_setting(r)
        say(f"  {r.policy.label():>12}: {r.stats['bits_per_token']:.4f} bits/token, "
            f"{r.tokens_per_s:,.0f} tokens/s, {r.seconds:.1f} s, lanes {100 * r.occupancy[0]:.0f}% busy "
            f"({100 * r.occupancy[1]:.0f}% of steps under half)")

    def stop(signum: int) -> None:
        raise Interrupted(signum, f"stopped by {signal_name(signum)}; the evaluation's runs end KILLED")

    try:
        with StopSignals(stop):
            results = evaluate(cfg, model, policies, dm, scored, progress)
        folder = out if out is not None else REPORTS_DIR / tracker.parent
        files = write_report(cfg, results, scored, folder, f"Checkpoint `{info.path}` (training run "
                             f"`{info.run_id}`), MLflow parent run `{tracker.parent}`")
        tracker.finish(files)
    except BaseException as exc:
        tracker.fail(exc)
        raise
    return tracker.parent, results, folder


def evaluate_grid(grid, outcome, report_dir: Path, say=print) -> List[str]:
    """`lrexp eval` of every cell the grid trained (FINISHED, or SKIPPED as finished before), with the grid's
    `evaluate:` overrides; each evaluation's parent run is tagged with the grid and its invocation's parent,
    its report written under `report_dir/eval/<cell>/`. Returns the cells whose evaluation failed."""
    failed = []
    for result in outcome.results:
        if result.status not in ("FINISHED", "SKIPPED") or not result.run_id:
            continue
        cell = result.cell
        try:
            checkpoint = ckpt_mod.locate(result.run_id, cell.config.train.checkpoint_dir)
            parent, _, folder = run(str(checkpoint), grid.evaluate, report_dir / "eval" / cell.dirname,
                                    {TAG_GRID: grid.name, TAG_GRID_PARENT: outcome.parent_id, TAG_CELL: cell.id}, say)
            say("\n" + (folder / "table.md").read_text().rstrip())
            say(f"\nevaluation report: {folder} (MLflow parent run {parent})")
        except UserError as exc:
            say(f"lrexp eval of cell {cell.id}: error: {exc}")
            failed.append(cell.id)
    return failed
