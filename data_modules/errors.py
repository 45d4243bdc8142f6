"""The data user error: a missing path, an empty corpus, a corpus that cannot fill the requested layout."""

from lrexp.errors import UserError


class DataError(UserError, ValueError):
    """One line naming the corpus problem; raised before any long work where the problem is knowable."""
