"""lrexp ui's page that opens the MLflow UI in Model-training mode (tracking/ui_app.py)."""

from __future__ import annotations

import pytest


@pytest.mark.slow  # imports MLflow's server app (FastAPI, Flask and its handlers)
def test_open_page_stores_model_training_and_opens_only_ui_pages():
    from starlette.testclient import TestClient

    from lrexp.tracking.ui_app import OPEN_PATH, app

    client = TestClient(app, base_url="http://127.0.0.1:5000")  # MLflow answers 403 to unknown hosts
    page = client.get(OPEN_PATH, params={"to": "/experiments/1/runs?viewStateShareKey=k"})
    assert page.status_code == 200
    assert 'localStorage.setItem("mlflow.workflowType_v1", "\\"machine_learning\\"")' in page.text
    assert 'location.replace("/#/experiments/1/runs?viewStateShareKey=k")' in page.text
    assert client.get(OPEN_PATH, params={"to": "https://elsewhere.example"}).status_code == 400
    assert client.get(OPEN_PATH, params={"to": "/experiments</script><script>x"}).text.count("</script>") == 1
