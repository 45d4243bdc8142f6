"""The config's user error, in a leaf module so that every layer of the code can raise it without importing
the loader or the registries."""

from lrexp.errors import UserError


class ConfigError(UserError, ValueError):
    """A user error in a config: the message is one line naming the key and the problem."""
