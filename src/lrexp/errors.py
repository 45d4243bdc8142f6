"""User errors: bad config, missing data, incompatible sizes. The CLI prints them as one line, no traceback."""


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
