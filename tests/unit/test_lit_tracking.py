"""MLflow setup without a store: the URI rule and the unwritable-store error."""

import pytest

from lrexp.config.load import load
from lrexp.config.paths import PROJECT_ROOT
from lrexp.tracking import store as tracking


def test_tracking_uri_is_config_then_environment_then_project_sqlite(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(load()) == f"sqlite:///{PROJECT_ROOT}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(load()) == "http://127.0.0.1:5000"
    cfg = load(overrides=["log.tracking_uri=sqlite:////tmp/x/mlflow.db"])
    assert tracking.tracking_uri(cfg) == "sqlite:////tmp/x/mlflow.db"


def test_artifacts_sit_beside_a_sqlite_store():
    assert tracking.artifact_location(f"sqlite:///{PROJECT_ROOT}/mlflow.db") == str(PROJECT_ROOT / "mlartifacts")
    assert tracking.artifact_location("http://127.0.0.1:5000") is None


def test_a_store_that_cannot_be_written_fails_in_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = load(overrides=[f"log.tracking_uri=sqlite:///{blocker}/mlflow.db"])
    with pytest.raises(tracking.TrackingError, match="cannot open a run in the MLflow tracking store .*a-file.*File exists"):
        tracking.open_run(cfg)
