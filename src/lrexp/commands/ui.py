"""`lrexp ui [--host H] [--port P]`

The MLflow UI over the project's store (`make ui`), after a line with the address of the latest grid
invocation's runs. With a tracking server (`MLFLOW_TRACKING_URI=http://...`) the server is the UI: only the
address is printed.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="port to serve on (default: 5000)")


def run(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient  # paid for by `lrexp ui` only, not by every command's parser

    # the config loader imports torch (the registries): not while the parser is built
    from lrexp.config.load import load
    from lrexp.tracking.names import TAG_GRID, latest_invocation, runs_url
    from lrexp.tracking.store import artifact_location, tracking_uri

    uri = tracking_uri(load())
    local = artifact_location(uri) is not None  # a sqlite store; anything else is a server
    base = f"http://{args.host}:{args.port}" if local else uri
    parent = latest_invocation(MlflowClient(uri))
    if parent is None:
        print(f"MLflow UI: {base} (no grid has run yet)", flush=True)
    else:
        grid = parent.data.tags.get(TAG_GRID, "?")
        print(f"MLflow UI: {base}; the latest grid ({grid}): {runs_url(base, parent)}", flush=True)
    if not local:
        return 0
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "--default-artifact-root",
                      artifact_location(uri), "--host", args.host, "--port", str(args.port)])
