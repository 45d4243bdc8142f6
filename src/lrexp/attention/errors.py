"""The attention errors: a leaf module, so the kernels (lrexp.kernels.attention) raise them without importing
the backend registry that imports the kernels."""

from lrexp.errors import UserError


class BackendError(UserError, ValueError):
    """An unknown attention backend, or a case the chosen backend does not support."""


class MaskError(UserError, ValueError):
    """A mask that cannot apply to the given query/key lengths."""
