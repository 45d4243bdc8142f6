"""The MLflow server app `lrexp ui` runs (`mlflow server --app-name lrexp`, the `mlflow.app` entry point):
MLflow's own, plus one page, `/lrexp/open?to=<a page of the UI>`, that opens a UI page in Model-training
mode for good (docs/ui.md#how-the-link-does-it).

The 3.17 UI is GenAI or Model training by its `workflowType`: the address's parameter, else the browser's
last choice (`localStorage["mlflow.workflowType_v1"]`, GenAI at first). The UI's own links drop the
parameter, so a run opened from the runs table showed its GenAI page; no experiment tag changes that. The
page sets the stored choice, as the UI's own switch does, then goes on to the UI page it was given.
"""

from __future__ import annotations

import json

from mlflow.server.fastapi_app import app
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from lrexp.tracking.view import OPEN_PATH

WORKFLOW_KEY = "mlflow.workflowType_v1"  # the UI's stored choice: `<key>_v<version>`, a JSON value
MODEL_TRAINING = "machine_learning"


def page(to: str) -> str:
    """The HTML that stores Model training as the UI's mode and goes on to the UI page `to` (`/experiments/...`)."""
    target = json.dumps("/#" + to).replace("</", "<\\/")
    return ("<!doctype html><meta charset='utf-8'><title>MLflow</title><script>"
            f"localStorage.setItem({json.dumps(WORKFLOW_KEY)}, {json.dumps(json.dumps(MODEL_TRAINING))});"
            f"location.replace({target});</script>")


async def open_page(request: Request) -> Response:
    to = request.query_params.get("to", "/experiments")
    if not to.startswith("/experiments"):  # a page of this UI only: never a redirect elsewhere
        return PlainTextResponse("`to` must be a page of the MLflow UI (/experiments/...)", status_code=400)
    return HTMLResponse(page(to))


# before MLflow's catch-all mount of its Flask app at "/", which would answer first
app.router.routes.insert(0, Route(OPEN_PATH, open_page, methods=["GET"]))
