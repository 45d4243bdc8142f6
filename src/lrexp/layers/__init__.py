"""Layers built from specs: the block, the recurrent cell, feedback, kNN memory, memory slots.

A variant (lrexp.variants) describes its stack as a list of `LayerSpec`; `build_layer` turns one into a
module through the `LAYER_KINDS` registry. A new layer kind is one file here that calls
`register_layer("<kind>", builder)` and is imported at the bottom of this file. The layer interface is
documented in lrexp.model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Optional

from torch import nn

if TYPE_CHECKING:
    from lrexp.config.schema import RunConfig


@dataclass(frozen=True)
class LayerSpec:
    """What one layer of the stack is. Everything else (sizes, knobs) comes from the config."""

    kind: str  # a name in LAYER_KINDS
    window: Optional[int]  # W of the sliding window (with an XL cache of W); None: dense causal over the segment


# builder(spec, cfg, backend) -> the layer module
LayerBuilder = Callable[[LayerSpec, "RunConfig", str], nn.Module]
LAYER_KINDS: Dict[str, LayerBuilder] = {}


def register_layer(kind: str, builder: LayerBuilder) -> None:
    if kind in LAYER_KINDS:
        raise ValueError(f"layer kind '{kind}' is registered twice")
    LAYER_KINDS[kind] = builder


def build_layer(spec: LayerSpec, cfg: "RunConfig", backend: str) -> nn.Module:
    if spec.kind not in LAYER_KINDS:
        raise ValueError(f"unknown layer kind '{spec.kind}'; available: {', '.join(sorted(LAYER_KINDS))}")
    return LAYER_KINDS[spec.kind](spec, cfg, backend)


from lrexp.layers import block  # noqa: E402,F401  (registers "attention")
from lrexp.layers import feedback  # noqa: E402,F401  (registers "feedback")
from lrexp.layers import recurrent  # noqa: E402,F401  (registers "recurrent")
from lrexp.layers import memorizing  # noqa: E402,F401  (registers "memorizing")
from lrexp.layers import slots  # noqa: E402,F401  (registers "slots")
