"""One MLflow server over a local store: for processes that write to it at once (`lrexp grid --jobs K`), and
for `lrexp ui`.

SQLite takes one writer at a time: K cells logging straight to `mlflow.db` fail now and then with
"database is locked", and MLflow's SQL store does not retry. Through one server on 127.0.0.1 with a single
worker process the writes reach the database from one place, and a request that still fails (a lock held
too long by a reader) comes back as HTTP 500, which MLflow's REST client retries with backoff (7 times by
default). Artifacts do not pass through the server: the experiments' artifact locations are local
folders the cells write to directly, as without a server.

The server never outlives the process that started it (docs/grids.md#faults-and-what-survives-them): it runs
under a small supervisor, this module run as a script, in a process group of its own (a Ctrl-C meant for
the grid must not stop the store its cells still write to). The supervisor holds the read end of a pipe
whose only write end is the starter's; when that closes, whatever ended the starter (its end, a
SIGKILL of its whole process group), the supervisor stops its group: the server, its workers and itself.
A stop takes about a second: SIGTERM, then SIGKILL for whatever still runs (SQLite's own journal keeps the
store whole).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator, List, Optional

from lrexp.errors import UserError
from lrexp.tracking.store import artifact_location

# The address of the server a grid's cells log through: a transport to the store their config names, so it
# takes precedence over `log.tracking_uri` (lit/run_logger.py) while the config keeps naming the store itself.
SERVER_ENV = "LREXP_TRACKING_SERVER"
START_TIMEOUT_S = 180.0  # measured: ~14 s on an idle 2-core machine, several times that beside training
STOP_GRACE_S = 1.0  # SIGTERM to SIGKILL: uvicorn's graceful shutdown waits for open connections far longer
# MLflow 3 starts job consumers (huey) beside the web worker unless told not to; lrexp submits no jobs.
JOBS_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
# MLflow's client prints "View run ... at http://127.0.0.1:<port>" when a run ends through a server: a link
# to a temporary server, dead once the grid ends, in every cell's log.
NO_LINKS_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def command(uri: str, artifact_root: str, host: str, port: int, workers: int = 1,
            app_name: Optional[str] = None) -> List[str]:
    """`mlflow server` over the store `uri`, new experiments' artifacts under `artifact_root`; `app_name` an
    `mlflow.app` entry point to serve instead of MLflow's own app. This interpreter's MLflow: the one that
    sees this installation's entry points."""
    app = ["--app-name", app_name] if app_name else []
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--default-artifact-root",
            artifact_root, "--no-serve-artifacts", "--host", host, "--port", str(port), "--workers", str(workers),
            *app]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serve(uri: str, artifact_root: str, host: str = "127.0.0.1", port: Optional[int] = None, workers: int = 1,
          app_name: Optional[str] = None, timeout_s: float = START_TIMEOUT_S) -> Iterator[str]:
    """`with serve(uri, root) as url:` a server over `uri` (on a free local port unless `port` is given)
    while the block runs; `url` is yielded once the server answers. Stopped in about a second at the end."""
    if port is None:
        port = free_port(host)
    elif listening(host, port):
        raise UserError(f"port {port} on {host} is already in use: give another port (--port)")
    url = f"http://{host}:{port}"
    env = {**os.environ, JOBS_ENV: os.environ.get(JOBS_ENV, "false")}  # no job consumers unless asked
    previous_links = os.environ.get(NO_LINKS_ENV)
    with tempfile.TemporaryFile("w+") as log:
        server = command(uri, artifact_root, host, port, workers, app_name)
        proc = subprocess.Popen([sys.executable, "-m", __name__, *server],
                                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
        os.environ[NO_LINKS_ENV] = "true"  # for the cells this process starts, and its own client
        try:
            deadline = time.monotonic() + timeout_s
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    lines = [ln for ln in log.read().splitlines() if ln.strip()]
                    why = lines[-1] if lines else f"exit status {proc.returncode}"
                    raise UserError(f"the MLflow server over {uri} did not start: {why}")
                time.sleep(0.5)
            yield url
        finally:
            _restore(NO_LINKS_ENV, previous_links)
            stop(proc)


def _restore(key: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def stop(proc: subprocess.Popen) -> None:
    """Close the supervisor's pipe (it stops its group), then make sure of it from here."""
    with contextlib.suppress(OSError):
        proc.stdin.close()
    try:
        proc.wait(timeout=STOP_GRACE_S + 2)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def serve_until_stopped(url: str) -> None:
    """Block while the server answers; a Ctrl-C (KeyboardInterrupt) ends the wait."""
    while _healthy(url):
        time.sleep(2)


def _stop_group() -> None:
    """SIGTERM to this process group, then after STOP_GRACE_S a SIGKILL, which ends the supervisor too."""
    signal.signal(signal.SIGTERM, lambda *_: None)  # the supervisor outlives the SIGTERM it sends
    with contextlib.suppress(ProcessLookupError):
        os.killpg(0, signal.SIGTERM)
    time.sleep(STOP_GRACE_S)
    os.killpg(0, signal.SIGKILL)


def supervise(cmd: List[str]) -> None:
    """Run `cmd` in this process group until stdin reaches its end (the starter closed it or died), then stop
    the group; exit with `cmd`'s status if it ends first (a server that did not start)."""
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    stopping = threading.Event()

    def reap() -> None:
        child.wait()
        if not stopping.is_set():  # it failed on its own: whatever it started goes with it
            os.killpg(0, signal.SIGKILL)

    threading.Thread(target=reap, daemon=True).start()
    while os.read(0, 4096):  # the starter writes nothing: this returns b"" when its end is closed
        pass
    stopping.set()
    _stop_group()


def artifact_root_of(uri: str) -> str:
    """Where experiments created through the server keep artifacts: beside a sqlite database, as without one."""
    root = artifact_location(uri)
    return root if root is not None else str(Path.cwd() / "mlartifacts")


if __name__ == "__main__":
    supervise(sys.argv[1:])
