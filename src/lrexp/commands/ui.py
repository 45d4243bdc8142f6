"""`lrexp ui [--host H] [--port P] [--workers N]`

The MLflow UI over the project's store (`make ui`): once the server answers, a line with the link to the
latest grid invocation's comparison (tracking/view.py): its cells, their final metrics as columns and their
validation curves as the first charts, in Model-training mode. The server runs MLflow's app with lrexp's
page that keeps the UI in that mode (tracking/ui_app.py), one web worker and no job consumers
(tracking/server.py); Ctrl-C stops it in about a second. With a tracking server
(`MLFLOW_TRACKING_URI=http://...`) the server is the UI: only the link is printed.
"""

from __future__ import annotations

import argparse

APP_NAME = "lrexp"  # the `mlflow.app` entry point (pyproject.toml): MLflow's app and tracking/ui_app.py's page


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="port to serve on (default: 5000)")
    parser.add_argument("--workers", type=int, default=1, help="web worker processes (default: 1)")


def run(args: argparse.Namespace) -> int:
    # the config loader imports torch (the registries): not while the parser is built
    from lrexp.config.load import load
    from lrexp.tracking.server import serve, serve_until_stopped
    from lrexp.tracking.store import artifact_location, client, tracking_uri
    from lrexp.tracking.view import ui_base

    uri = tracking_uri(load())
    base, local = ui_base(uri, args.host, args.port)
    if not local:
        say(client(uri, write=False), base, lrexp_ui=False)
        return 0
    try:  # Ctrl-C is how the UI is stopped: the server with it, in about a second (tracking/server.py)
        with serve(uri, artifact_location(uri), host=args.host, port=args.port, workers=args.workers,
                   app_name=APP_NAME) as base:
            say(client(uri, write=False), base)  # now that the server answers: the first load of the link works
            serve_until_stopped(base)
    except KeyboardInterrupt:
        pass
    print("MLflow UI stopped", flush=True)
    return 0


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
