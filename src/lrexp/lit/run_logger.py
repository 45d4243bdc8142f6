"""The Lightning logger of one training run: a thin adapter that opens, reopens and ends the run through
the one run writer (tracking/runs.py) and hands its id to Lightning's `MLFlowLogger` for the metrics.

- The run is created, and its id read, before `fit`: under DDP only rank 0 owns a run, and a run created
  lazily inside a forked worker would be lost to the main process.
- Params are the flattened resolved config, logged once (MLflow params are immutable); the YAML goes in as
  the `config.yaml` artifact. A resumed run keeps its params; values that changed are recorded as
  `lrexp.resume.<key>` tags.
- `$LREXP_TRACKING_SERVER`, set by `lrexp grid --jobs K` for its cells, is the address the run logs
  through; the config still names the store behind it.
- A store that cannot be written fails here, before any data or model work, with one line.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

from lrexp.config.load import flatten, to_yaml
from lrexp.config.schema import RunConfig
from lrexp.model.variants import row_name
from lrexp.tracking import runs
from lrexp.tracking.names import TAG_GIT_SHA, TAG_RESUME, TAG_ROW, TAG_SCALE
from lrexp.tracking.run_names import standalone_name
from lrexp.tracking.server import SERVER_ENV
from lrexp.tracking.store import (
    TrackingError, artifact_location, client as store_client, experiment_id, tracking_uri,
)


def run_tags(cfg: RunConfig) -> Dict[str, str]:
    return {
        **{k: str(v) for k, v in cfg.log.tags.items()},  # a grid's mlflow.parentRunId, lrexp.grid, lrexp.cell
        TAG_ROW: row_name(cfg),
        TAG_SCALE: cfg.scale.name,
        TAG_GIT_SHA: runs.git_sha(),
    }


def open_run(cfg: RunConfig, resume_run_id: Optional[str] = None) -> MLFlowLogger:
    """Create (or reopen) the run, log params, config.yaml and tags. Only rank 0 talks to MLflow. A grid
    running cells at once hands them the server it serves the store through (tracking/server.py)."""
    store = tracking_uri(cfg)
    uri = os.environ.get(SERVER_ENV) or store
    tags = run_tags(cfg)
    logger_args = dict(experiment_name=cfg.log.experiment, run_name=cfg.log.run_name, tracking_uri=uri,
                       artifact_location=artifact_location(store))
    if rank_zero_only.rank != 0:
        return MLFlowLogger(**logger_args, tags=None if resume_run_id else dict(tags), run_id=resume_run_id)
    what = f"run {resume_run_id} in" if resume_run_id else "a run in"
    try:  # the client opens (and for sqlite creates) the store right away
        exp = experiment_id(store_client(uri), cfg.log.experiment, store)
        # the run name (a grid's cell name, else the row's and the time) and MLflow's own context tags
        # (source, user), as Lightning creates a run
        new = {**tags, "mlflow.runName": cfg.log.run_name or standalone_name(tags[TAG_ROW])}
        run_id = resume_run_id or runs.open_run(MlflowClient(uri), exp, None, resolve_tags(new))
        logger = MLFlowLogger(**logger_args, run_id=run_id)
        client = logger.experiment  # reads the run now: an unknown resume id fails here
    except TrackingError:  # a read-only store, said already
        raise
    except Exception as exc:  # sqlalchemy, mlflow and OS errors alike
        raise TrackingError(f"cannot open {what} the MLflow tracking store {uri}: {runs.one_line(exc)}") from None
    try:
        if resume_run_id:
            recorded = client.get_run(run_id).data.params
            changed = {
                f"{TAG_RESUME}{k}": str(v)[:250]
                for k, v in flatten(cfg).items()
                if k in recorded and recorded[k] != str(v)[:250]
            }
            runs.reopen(client, run_id)  # the error an earlier attempt stopped with is no longer true
            set_tags(logger, {**tags, **changed})
        else:
            logger.log_hyperparams(flatten(cfg))
            client.log_text(run_id, to_yaml(cfg), "config.yaml")
    except Exception as exc:
        raise TrackingError(f"cannot write the MLflow tracking store {uri}: {runs.one_line(exc)}") from None
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
        runs.finish(logger.experiment, logger.run_id)


def fail(logger: MLFlowLogger, exc: BaseException) -> None:
    """FAILED, or KILLED when a signal stopped the run (tracking/runs.py); never hides the original error."""
    if rank_zero_only.rank == 0:
        runs.end_on_error(logger.experiment, logger.run_id, exc)
