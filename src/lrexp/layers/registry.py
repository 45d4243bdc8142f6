"""The layer-kind registry: a `LayerSpec` names a kind, `build_layer` builds it through `LAYER_KINDS`.

A leaf module: each kind's module (lrexp.layers.block, ...) imports it to `register_layer` itself, and the
package `lrexp.layers` imports every kind, so `build_layer` finds them all once the package is imported.
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
