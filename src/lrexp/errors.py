"""User errors: bad config, missing data, incompatible sizes. The CLI prints them as one line, no traceback."""

import errno
from typing import Optional


class UserError(Exception):
    """Something the user can fix; the message is one line that names the problem."""


class Interrupted(BaseException):
    """A command stopped on purpose by SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C); the message says
    what was kept and how to go on. A BaseException, like KeyboardInterrupt, so no `except Exception` eats it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's status for a process ended by this signal


class StorageError(UserError):
    """A file or folder lrexp must write cannot be written: a full disk, a read-only filesystem, no permission."""


def storage_error(what: str, path: object, exc: OSError, key: Optional[str] = None) -> StorageError:
    """One line naming the path, the cause and what to do; `key`: the setting that moves it elsewhere."""
    fix = "free space on its disk" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    where = f"set {key} to another folder" if key else "write elsewhere"
    return StorageError(f"cannot write {what}{path}: {exc.strerror or exc}; {fix} or {where}")


_NO_SPACE_OR_RIGHTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_SQLITE = {"database or disk is full": "free space on its disk", "readonly database": "make it writable"}


def storage_failure(exc: BaseException) -> Optional[StorageError]:
    """`exc` (or an error it wraps) as one line when a write failed for want of space or rights, else None:
    an OSError names its file; SQLite's errors come from the MLflow store."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE_OR_RIGHTS:
            return storage_error("", seen.filename or "a file", seen)
        for text, fix in _SQLITE.items():
            if text in str(seen):
                return StorageError(f"cannot write the MLflow store: {text}; {fix} or set log.tracking_uri "
                                    f"(or $MLFLOW_TRACKING_URI) to another store")
        seen = seen.__cause__ or seen.__context__
    return None
