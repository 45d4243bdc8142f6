"""The MLflow store lrexp writes to (docs/grids.md#the-mlflow-contract): its URI, where its artifacts go,
and the experiments in it. No Lightning and no MLflow import: a grid learns its store without either.

- The tracking URI is always explicit: `log.tracking_uri`, else `$MLFLOW_TRACKING_URI` read now (the
  logger's own default is read at import time), else `sqlite:///<project root>/mlflow.db`. Artifacts of a
  sqlite store go to `mlartifacts/` next to the database (the project root by default).
- A sqlite store is opened under a lock on its folder (`client`): MLflow creates a new store's tables when a
  client first opens it, and two processes doing that at once (two grids started together) collide with
  "table experiments already exists".
- Every experiment lrexp creates is tagged `mlflow.experimentKind=custom_model_development` (docs/grids.md#the-mlflow-contract).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator, Optional

from lrexp.config.paths import PROJECT_ROOT
from lrexp.config.schema import RunConfig
from lrexp.errors import UserError

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


def client(uri: str, write: bool = True):
    """An `MlflowClient` over `uri`; a sqlite store is opened (and, the first time, created) under a lock,
    and one that is read-only where `write` is asked is refused in one line."""
    from mlflow.tracking import MlflowClient  # this module stays free of MLflow for those that only need paths

    if not uri.startswith(_SQLITE):
        return MlflowClient(uri)
    db = Path(uri[len(_SQLITE):])
    if write:
        _check_writable(db)
    with _locked(db.parent):
        return MlflowClient(uri)


def _check_writable(db: Path) -> None:
    """SQLite writes the database and a journal beside it: both the file and its folder must be writable."""
    for path in (db, db.parent):
        if path.exists() and not os.access(path, os.W_OK):
            raise TrackingError(f"the MLflow store {db} is read-only ({path} cannot be written): make it writable, "
                                f"or set log.tracking_uri or $MLFLOW_TRACKING_URI to a store that is")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` while the block runs: no file of its own is left beside the store.
    Without the folder there is nothing to lock; opening the store then fails and says why."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


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
