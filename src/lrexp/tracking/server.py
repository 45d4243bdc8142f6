"""One MLflow server over a local store, for processes that write to it at once (`lrexp grid --jobs K`).

SQLite takes one writer at a time: K cells logging straight to `mlflow.db` fail now and then with
"database is locked", and MLflow's SQL store does not retry. Through one server on 127.0.0.1 with a single
worker process the writes reach the database from one place, and a request that still fails (a lock held
too long by a reader) comes back as HTTP 500, which MLflow's REST client retries with backoff (7 times by
default). Artifacts do not pass through the server: the experiments' artifact locations are local
folders the cells write to directly, as without a server.

`lrexp ui` serves the same store with the same command line, in the foreground.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, List

from lrexp.errors import UserError
from lrexp.tracking.store import artifact_location

# The address of the server a grid's cells log through: a transport to the store their config names, so it
# takes precedence over `log.tracking_uri` (lit/run_logger.py) while the config keeps naming the store itself.
SERVER_ENV = "LREXP_TRACKING_SERVER"
START_TIMEOUT_S = 180.0  # measured: ~14 s on an idle 2-core machine, several times that beside training


def command(uri: str, artifact_root: str, host: str, port: int) -> List[str]:
    """`mlflow server` over the store `uri`, new experiments' artifacts under `artifact_root`, one worker."""
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    return [mlflow, "server", "--backend-store-uri", uri, "--default-artifact-root", artifact_root,
            "--no-serve-artifacts", "--host", host, "--port", str(port), "--workers", "1"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serve(uri: str, artifact_root: str, timeout_s: float = START_TIMEOUT_S) -> Iterator[str]:
    """`with serve(uri, root) as url:` a server over `uri` on a free local port while the block runs."""
    host, port = "127.0.0.1", free_port()
    url = f"http://{host}:{port}"
    with tempfile.TemporaryFile("w+") as log:
        # Its own process group: a Ctrl-C meant for the grid must not stop the store its cells still write
        # their checkpoints' tags to, and `mlflow server` runs uvicorn as a child, stopped with it below.
        proc = subprocess.Popen(command(uri, artifact_root, host, port), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        try:
            deadline = time.monotonic() + timeout_s
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    lines = [ln for ln in log.read().splitlines() if ln.strip()]
                    why = lines[-1] if lines else f"exit status {proc.returncode}"
                    raise UserError(f"the MLflow server for concurrent cells did not start over {uri}: {why}")
                time.sleep(0.5)
            yield url
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def artifact_root_of(uri: str) -> str:
    """Where experiments created through the server keep artifacts: beside a sqlite database, as without one."""
    root = artifact_location(uri)
    return root if root is not None else str(Path.cwd() / "mlartifacts")
