"""One attention function with pluggable backends; masks; relative position bias; the blockwise window.

`attend(q, k, v, mask=MaskSpec(...), bias=..., scale=..., backend=...)` is the only attention computation
in lrexp; layers build on `sliding_window_attention`, `RelativePositionBias`, `l2_normalize`, `HeadScale`.
`attend_rows` is the same function (the reference backend's math) over keys at explicit distances, with the
probabilities returned: a bounded KV cache's keys (lrexp.cache) are no contiguous run a `MaskSpec` describes.
"""

from lrexp.attention.backends import BACKENDS, attend, register_backend, resolve_backend
from lrexp.attention.bias import BiasSpec, RelativePositionBias, relative_bucket
from lrexp.attention.errors import BackendError, MaskError
from lrexp.attention.mask import MaskSpec
from lrexp.attention.qk import HeadScale, l2_normalize
from lrexp.attention.rows import attend_rows
from lrexp.attention.window import sliding_window_attention

__all__ = [
    "BACKENDS", "BackendError", "BiasSpec", "HeadScale", "MaskError", "MaskSpec", "RelativePositionBias", "attend",
    "attend_rows", "l2_normalize", "register_backend", "relative_bucket", "resolve_backend", "sliding_window_attention",
]
