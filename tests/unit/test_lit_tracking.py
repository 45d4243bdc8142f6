"""MLflow setup: the URI rule, the unwritable-store error, and how the one run writer ends a run."""

import pytest
from mlflow.tracking import MlflowClient

from lrexp.config.load import load
from lrexp.config.paths import PROJECT_ROOT
from lrexp.errors import Interrupted
from lrexp.lit.run_logger import open_run
from lrexp.tracking import runs
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
        open_run(cfg)


@pytest.mark.parametrize("exc, status, error", [
    (ValueError("the data module broke\nsecond line"), "FAILED", "ValueError: the data module broke"),
    (Interrupted(15, "stopped by SIGTERM at step 2"), "KILLED", "stopped by SIGTERM at step 2"),
    (KeyboardInterrupt(), "KILLED", "interrupted"),
    (SystemExit(1), "KILLED", "interrupted"),  # Lightning's Ctrl+C inside fit
])
def test_a_run_that_an_error_stops_ends_failed_or_killed_with_the_error_tag(tmp_path, exc, status, error):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = runs.open_run(client, tracking.experiment_id(client, "lrexp", uri), "r", {})
    runs.end_on_error(client, run_id, exc)
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["lrexp.error"]) == (status, error)
    runs.reopen(client, run_id)  # trained on: RUNNING, the old error gone
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and "lrexp.error" not in run.data.tags


def test_the_error_tag_is_cut_to_what_a_tag_holds(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = runs.open_run(client, tracking.experiment_id(client, "lrexp", uri), "r", {})
    runs.fail(client, run_id, "x" * 9000)
    assert len(client.get_run(run_id).data.tags["lrexp.error"]) == runs.ERROR_CHARS
