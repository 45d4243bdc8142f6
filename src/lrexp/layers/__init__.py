"""Layers built from specs: the block, the recurrent cell, feedback, kNN memory, memory slots.

A variant (lrexp.model.variants) describes its stack as a list of `LayerSpec`; `build_layer` turns one into a
module through the `LAYER_KINDS` registry (lrexp.layers.registry). A new layer kind is one file here that
calls `register_layer("<kind>", builder)` and is imported below. The layer interface is documented in
lrexp.model.lm.
"""

from lrexp.layers.registry import LAYER_KINDS, LayerSpec, build_layer, register_layer
from lrexp.layers import block, feedback, memorizing, recurrent, slots  # noqa: F401  (each registers its kind)

__all__ = ["LAYER_KINDS", "LayerSpec", "build_layer", "register_layer"]
