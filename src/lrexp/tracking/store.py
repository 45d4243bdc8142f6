"""MLflow setup for one training run (DESIGN.md section 6, engineering.md 5).

- The tracking URI is always explicit: `log.tracking_uri`, else `$MLFLOW_TRACKING_URI` read now (the
  logger's own default is read at import time), else `sqlite:///<project root>/mlflow.db`. Artifacts of a
  sqlite store go to `mlartifacts/` next to the database (the project root by default).
- The run is created, and its id read, before `fit`: under DDP only rank 0 owns a run, and a run created
  lazily inside a forked worker would be lost to the main process.
- Params are the flattened resolved config, logged once (MLflow params are immutable); the YAML goes in as
  the `config.yaml` artifact. A resumed run keeps its params; values that changed are recorded as
  `lrexp.resume.<key>` tags.
- Every experiment lrexp creates is tagged `mlflow.experimentKind=custom_model_development` (DESIGN.md 6).
- `$LREXP_TRACKING_SERVER`, set by `lrexp grid --jobs K` for its cells, is the address the run logs
  through; the config still names the store behind it.
- A store that cannot be written fails here, before any data or model work, with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from lrexp.config.load import flatten, to_yaml
from lrexp.config.paths import PROJECT_ROOT
from lrexp.config.schema import RunConfig
from lrexp.errors import Interrupted, UserError
from lrexp.tracking.names import TAG_ERROR
from lrexp.tracking.server import SERVER_ENV
from lrexp.model.variants import row_name

_SQLITE = "sqlite:///"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


class TrackingError(UserError, RuntimeError):
    """The MLflow tracking store cannot be reached or written."""


def tracking_uri(cfg: RunConfig) -> str:
    return cfg.log.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"{_SQLITE}{PROJECT_ROOT}/mlflow.db"


def artifact_location(uri: str) -> Optional[str]:
    """`mlartifacts/` beside a sqlite database; a tracking server picks its own."""
    if uri.startswith(_SQLITE):
        return str(Path(uri[len(_SQLITE):]).resolve().parent / "mlartifacts")
    return None


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created if missing, and tagged as model training (`mlflow.experimentKind`): the
    MLflow 3 UI opens an experiment without that tag on its GenAI overview, not on its runs."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri), tags=EXPERIMENT_KIND)
        except Exception:  # another process created it first (cells started at once): theirs is as good
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    for key, value in EXPERIMENT_KIND.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def git_sha() -> str:
    """HEAD of the project's repository, with "-dirty" when tracked files differ from it."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "unknown"
    dirty = git("diff", "--quiet", "HEAD").returncode == 1
    return head.stdout.strip() + ("-dirty" if dirty else "")


def run_tags(cfg: RunConfig) -> Dict[str, str]:
    return {
        **{k: str(v) for k, v in cfg.log.tags.items()},  # a grid's mlflow.parentRunId, lrexp.grid, lrexp.cell
        "lrexp.row": row_name(cfg),
        "lrexp.scale": cfg.scale.name,
        "lrexp.git_sha": git_sha(),
    }


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def open_run(cfg: RunConfig, resume_run_id: Optional[str] = None) -> MLFlowLogger:
    """Create (or reopen) the run, log params, config.yaml and tags. Only rank 0 talks to MLflow. A grid
    running cells at once hands them the server it serves the store through (store_server.py)."""
    store = tracking_uri(cfg)
    uri = os.environ.get(SERVER_ENV) or store
    tags = run_tags(cfg)
    try:  # the client opens (and for sqlite creates) the store right away
        if rank_zero_only.rank == 0:
            experiment_id(MlflowClient(uri), cfg.log.experiment, store)
        logger = MLFlowLogger(
            experiment_name=cfg.log.experiment,
            run_name=cfg.log.run_name,
            tracking_uri=uri,
            tags=None if resume_run_id else dict(tags),
            artifact_location=artifact_location(store),
            run_id=resume_run_id,
        )
        if rank_zero_only.rank != 0:
            return logger
        run_id = logger.run_id
        client = logger.experiment
    except Exception as exc:  # sqlalchemy, mlflow and OS errors alike
        what = f"run {resume_run_id} in" if resume_run_id else "a run in"
        raise TrackingError(f"cannot open {what} the MLflow tracking store {uri}: {_one_line(exc)}") from None
    try:
        if resume_run_id:
            earlier = client.get_run(run_id).data
            recorded = earlier.params
            changed = {
                f"lrexp.resume.{k}": str(v)[:250]
                for k, v in flatten(cfg).items()
                if k in recorded and recorded[k] != str(v)[:250]
            }
            client.update_run(run_id, status="RUNNING")
            if TAG_ERROR in earlier.tags:  # why an earlier attempt stopped, no longer true
                client.delete_tag(run_id, TAG_ERROR)
            set_tags(logger, {**tags, **changed})
        else:
            logger.log_hyperparams(flatten(cfg))
            client.log_text(run_id, to_yaml(cfg), "config.yaml")
    except Exception as exc:
        raise TrackingError(f"cannot write the MLflow tracking store {uri}: {_one_line(exc)}") from None
    return logger


def set_tags(logger: MLFlowLogger, tags: Mapping[str, Any]) -> None:
    if rank_zero_only.rank == 0:
        logger.experiment.log_batch(logger.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact_dict(logger: MLFlowLogger, data: Dict[str, Any], name: str) -> None:
    if rank_zero_only.rank == 0:
        plain = json.loads(json.dumps(data, default=str))  # numpy scalars, paths: as text, never a crash
        logger.experiment.log_dict(logger.run_id, plain, name)


def finish(logger: MLFlowLogger, final: Mapping[str, float], step: int) -> None:
    """Summary metrics, then FINISHED (Lightning's own finalize already ran at the end of fit)."""
    if rank_zero_only.rank == 0:
        logger.log_metrics(dict(final), step=step)
        logger.experiment.set_terminated(logger.run_id, "FINISHED")


def fail(logger: MLFlowLogger, exc: BaseException) -> None:
    """FAILED with the error as the `lrexp.error` tag, or KILLED when a signal stopped the run (its
    checkpoint, if any, continues it); never hides the original error."""
    if rank_zero_only.rank != 0:
        return
    try:
        client = logger.experiment
        if isinstance(exc, Interrupted):
            status, error = "KILLED", str(exc)
        elif isinstance(exc, (KeyboardInterrupt, SystemExit)):  # Lightning turns Ctrl+C inside fit into SystemExit
            status, error = "KILLED", "interrupted"
        else:
            status, error = "FAILED", _one_line(exc)
        client.set_tag(logger.run_id, TAG_ERROR, error[:5000])
        client.set_terminated(logger.run_id, status)
    except Exception:  # the store itself may be what failed; the caller re-raises the original error
        pass
