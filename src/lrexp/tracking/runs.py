"""The one writer of MLflow runs' lifecycles: every run lrexp opens (a training run, a grid's parent and the
cells it records itself, an evaluation and its settings) is opened, reopened and ended here, so a run that
stops ends the same way whoever wrote it: FAILED with its error as the `lrexp.error` tag, or KILLED when a
signal stopped it (its checkpoint, if any, continues it).

Each function takes an `MlflowClient` and a run id: the caller owns the client (a grid's points at the local
server while cells write at once), and this module imports neither MLflow nor Lightning.
"""

from __future__ import annotations

import subprocess
from typing import Dict, Optional

from lrexp.config.paths import PROJECT_ROOT
from lrexp.errors import Interrupted
from lrexp.tracking.names import TAG_ERROR

ERROR_CHARS = 5000  # an MLflow tag value holds at most 8000 characters; the first lines say why


def open_run(client, experiment_id: str, name: Optional[str], tags: Dict[str, str]) -> str:
    """A new run, RUNNING, with `tags`; its id."""
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def reopen(client, run_id: str) -> None:
    """RUNNING again, for more work in the same run; the error an earlier attempt ended with goes."""
    client.update_run(run_id, status="RUNNING")
    if TAG_ERROR in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, TAG_ERROR)


def end(client, run_id: str, status: str, error: Optional[str] = None) -> None:
    """`status` (FINISHED, FAILED, KILLED), with `error` as the `lrexp.error` tag when given."""
    if error is not None:
        client.set_tag(run_id, TAG_ERROR, error[:ERROR_CHARS])
    client.set_terminated(run_id, status)


def finish(client, run_id: str) -> None:
    end(client, run_id, "FINISHED")


def fail(client, run_id: str, error: str) -> None:
    end(client, run_id, "FAILED", error)


def kill(client, run_id: str, error: str) -> None:
    end(client, run_id, "KILLED", error)


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`: an error as one tag value or one line of output."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def end_on_error(client, run_id: str, exc: BaseException) -> None:
    """The run that `exc` stopped: KILLED by a signal (`Interrupted`; Ctrl-C, which Lightning turns into
    SystemExit inside fit), else FAILED with the error. Never raises: the store itself may be what failed,
    and the caller re-raises the original error."""
    try:
        if isinstance(exc, Interrupted):
            kill(client, run_id, str(exc))
        elif isinstance(exc, (KeyboardInterrupt, SystemExit)):
            kill(client, run_id, "interrupted")
        else:
            fail(client, run_id, one_line(exc))
    except Exception:
        pass


def git_sha() -> str:
    """HEAD of the project's repository, with "-dirty" when tracked files differ from it."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "unknown"
    dirty = git("diff", "--quiet", "HEAD").returncode == 1
    return head.stdout.strip() + ("-dirty" if dirty else "")
