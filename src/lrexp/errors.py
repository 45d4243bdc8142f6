"""User errors: bad config, missing data, incompatible sizes. The CLI prints them as one line, no traceback."""


class UserError(Exception):
    """Something the user can fix; the message is one line that names the problem."""
