"""`lrexp ui [--host H] [--port P]`

The MLflow UI over the project's store (`make ui`): a line with the address of the latest grid
invocation's runs once the server answers, one web worker and no job consumers (tracking/server.py); Ctrl-C
stops it in about a second. With a tracking server (`MLFLOW_TRACKING_URI=http://...`) the server is the UI:
only the address is printed.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="port to serve on (default: 5000)")
    parser.add_argument("--workers", type=int, default=1, help="web worker processes (default: 1)")


def run(args: argparse.Namespace) -> int:
    # the config loader imports torch (the registries): not while the parser is built
    from lrexp.config.load import load
    from lrexp.tracking.server import serve, serve_until_stopped
    from lrexp.tracking.store import artifact_location, client, tracking_uri

    uri = tracking_uri(load())
    local = artifact_location(uri) is not None  # a sqlite store; anything else is a server
    if not local:
        _say(uri, client(uri, write=False))
        return 0
    try:  # Ctrl-C is how the UI is stopped: the server with it, in about a second (tracking/server.py)
        with serve(uri, artifact_location(uri), host=args.host, port=args.port, workers=args.workers) as base:
            _say(base, client(uri, write=False))  # now that the server answers: the first load of the link works
            serve_until_stopped(base)
    except KeyboardInterrupt:
        pass
    print("MLflow UI stopped", flush=True)
    return 0


def _say(base: str, client) -> None:
    from lrexp.tracking.names import TAG_GRID, latest_invocation, runs_url  # mlflow: see run()

    parent = latest_invocation(client)
    if parent is None:
        print(f"MLflow UI: {base} (no grid has run yet)", flush=True)
    else:
        grid = parent.data.tags.get(TAG_GRID, "?")
        print(f"MLflow UI: {base}; the latest grid ({grid}): {runs_url(base, parent)}", flush=True)
