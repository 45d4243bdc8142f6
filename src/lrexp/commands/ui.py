"""`lrexp ui [--host H] [--port P]`

The MLflow UI over the project's store (`make ui`), after a line with the link to the latest grid
invocation's comparison (tracking/view.py): its cells, their final metrics as columns and their validation
curves as the first charts, in Model-training mode. The server runs MLflow's app with lrexp's page that keeps
the UI in that mode (tracking/ui_app.py). With a tracking server (`MLFLOW_TRACKING_URI=http://...`) the
server is the UI: only the link is printed.
"""

from __future__ import annotations

import argparse
import os
import sys

APP_NAME = "lrexp"  # the `mlflow.app` entry point (pyproject.toml): MLflow's app and tracking/ui_app.py's page


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="port to serve on (default: 5000)")


def run(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient  # paid for by `lrexp ui` only, not by every command's parser

    # the config loader imports torch (the registries): not while the parser is built
    from lrexp.config.load import load
    from lrexp.tracking.store import artifact_location, tracking_uri
    from lrexp.tracking.view import ui_base

    uri = tracking_uri(load())
    base, local = ui_base(uri, args.host, args.port)
    say(MlflowClient(uri), base, local)
    if not local:
        return 0
    # this interpreter's MLflow: the one that sees lrexp's `mlflow.app` entry point
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                              "--default-artifact-root", artifact_location(uri), "--host", args.host,
                              "--port", str(args.port), "--app-name", APP_NAME])


def say(client, base: str, lrexp_ui: bool = True) -> None:
    """The line with the latest grid invocation's comparison, its view published now."""
    from lrexp.report.collect import collect  # mlflow and the report's readers: see run()
    from lrexp.tracking.names import TAG_GRID, latest_invocation
    from lrexp.tracking.view import publish

    parent = latest_invocation(client)
    if parent is None:
        print(f"MLflow UI: {base} (no grid has run yet)", flush=True)
        return
    grid = parent.data.tags.get(TAG_GRID, "?")
    url = publish(client, parent, collect(client, parent), base, lrexp_ui)
    print(f"MLflow UI: {base}; the latest grid ({grid}), its comparison: {url}", flush=True)
