"""`lrexp eval`: a trained row evaluated from its checkpoint as a bounded multi-state RNN (cache_policies.md
A.6): every KV-cache policy x budget over the same scored targets as the training's final pass
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

from lrexp.config import PROJECT_ROOT, RunConfig
from lrexp.errors import Interrupted, UserError
from lrexp.eval.load import EvalError, load
from lrexp.eval.passes import Result, evaluate, setting_metrics, setting_params, settings, stream
from lrexp.lit import checkpoint as ckpt_mod
from lrexp.model.variants import row_name
from lrexp.report import plots, tables
from lrexp.runtime.signals import StopSignals
from lrexp.runtime.signals import name as signal_name
from lrexp.tracking.names import TAG_CELL, TAG_ERROR, TAG_GRID, TAG_PARENT, TAG_ROLE
from lrexp.train.run import cpu_threads

REPORTS_DIR = PROJECT_ROOT / "reports" / "eval"
TAG_CHECKPOINT_RUN = "lrexp.checkpoint_run"  # the training run whose checkpoint an evaluation read
TAG_GRID_PARENT = "lrexp.grid_parent"  # an evaluation run by a grid: the invocation's parent run
SPLITS = {"test": "test", "validation": "validation", "val": "validation", "train": "train"}


class EvalTracker:
    """The evaluation's MLflow runs: the parent (RUNNING while it evaluates) and a child per setting."""

    def __init__(self, cfg: RunConfig, info: Dict[str, Any], checkpoint_run: Optional[str],
                 tags: Dict[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        from lrexp.tracking import store as tracking
        from lrexp.model.variants import row_name

        self.cfg, self.info = cfg, info
        uri = tracking.tracking_uri(cfg)
        try:
            self.client = MlflowClient(uri)
            self.experiment = tracking.experiment_id(self.client, cfg.log.experiment, uri)
        except Exception as exc:
            raise tracking.TrackingError(f"cannot open the MLflow tracking store {uri}: {exc}") from None
        # not the checkpoint's log.tags: a grid cell's hold its grid parent, which this run is no child of
        self.tags = {"lrexp.row": row_name(cfg), "lrexp.scale": cfg.scale.name, "lrexp.git_sha": tracking.git_sha(),
                     TAG_CHECKPOINT_RUN: str(checkpoint_run), "lrexp.eval.targets": str(info["targets"]),
                     "lrexp.eval.docs_hash": info["docs_hash"], **tags}
        self.parent = self.client.create_run(self.experiment, run_name=f"eval:{row_name(cfg)}:{str(checkpoint_run)[:8]}",
                                             tags={**self.tags, TAG_ROLE: "eval"}).info.run_id
        p = cfg.policy
        for key, value in {"policies": ",".join(p.names), "budgets": ",".join(map(str, p.budgets)),
                           "mode": p.mode, "block": info["block"], "context": info["context"],
                           "split": info["split"]}.items():
            self.client.log_param(self.parent, key, str(value))

    def log_setting(self, r: Result) -> None:
        child = self.client.create_run(self.experiment, run_name=r.policy.label(),
                                       tags={**self.tags, TAG_PARENT: self.parent, TAG_ROLE: "eval-setting"})
        run_id = child.info.run_id
        for key, value in setting_params(self.cfg, r.policy, self.info).items():
            self.client.log_param(run_id, key, value)
        for key, value in setting_metrics(r).items():
            self.client.log_metric(run_id, key, value)
        self.client.log_dict(run_id, {str(d): {"nll": v[0], "targets": v[1]} for d, v in sorted(r.per_document.items())},
                             "per_document_nll.json")
        self.client.set_terminated(run_id, "FINISHED")
        r.run_id = run_id

    def finish(self, files: Sequence[Path]) -> None:
        for path in files:
            self.client.log_artifact(self.parent, str(path), "report")
        self.client.set_terminated(self.parent, "FINISHED")

    def fail(self, exc: BaseException) -> None:
        try:
            self.client.set_tag(self.parent, TAG_ERROR, str(exc)[:5000])
            killed = isinstance(exc, (KeyboardInterrupt, Interrupted))
            self.client.set_terminated(self.parent, "KILLED" if killed else "FAILED")
        except Exception:  # the store itself may be what failed; the caller re-raises the original error
            pass


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
    torch.set_num_threads(cpu_threads(cfg))
    tracker = EvalTracker(cfg, scored, info.run_id, tags or {})
    say(f"lrexp eval: {len(policies)} settings of {info.path} over split {split} ({scored['targets']:,} targets), "
        f"MLflow experiment {cfg.log.experiment}, parent run {tracker.parent}")

    def progress(r: Result) -> None:
        tracker.log_setting(r)
        say(f"  {r.policy.label():>12}: {r.stats['bits_per_token']:.4f} bits/token, "
            f"{r.tokens_per_s:,.0f} tokens/s, {r.seconds:.1f} s")

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
