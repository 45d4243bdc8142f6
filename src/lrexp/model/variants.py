"""The paper's rows as spec builders: variant name -> per-layer `LayerSpec`s, plus the row's paper name.

A variant is registered once with `register_variant(name, layers, row_name)`; `cfg.model.variant` picks
it and the model is assembled from `layer_specs(cfg)`. The segment length N is not part of a variant: it
comes from the row YAML (`blocks_per_segment`), which is why XL and Slide share one stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List

from lrexp.config.errors import ConfigError
from lrexp.errors import UserError
from lrexp.layers import LayerSpec

if TYPE_CHECKING:
    from lrexp.config.schema import RunConfig


class VariantError(UserError, ValueError):
    """An unknown model variant."""


@dataclass(frozen=True)
class Variant:
    layers: Callable[["RunConfig"], List[LayerSpec]]  # the stack, bottom first
    row_name: Callable[["RunConfig"], str]  # the paper's row name at this config's sizes
    # Its logits do not depend on where a stream is cut into segments (every layer windowed with the previous
    # keys carried, any recurrent state carried exactly): evaluation may then read longer segments than
    # training, the same function at fewer sequential steps. Checked for every row in the equivalence tests.
    segment_invariant: bool = False


VARIANTS: Dict[str, Variant] = {}


def register_variant(name: str, layers: Callable[["RunConfig"], List[LayerSpec]],
                     row_name: Callable[["RunConfig"], str], segment_invariant: bool = False) -> None:
    if name in VARIANTS:
        raise ValueError(f"variant '{name}' is registered twice")
    VARIANTS[name] = Variant(layers, row_name, segment_invariant)


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise VariantError(f"unknown model variant '{name}'; available: {', '.join(sorted(VARIANTS))}")
    return VARIANTS[name]


def layer_specs(cfg: "RunConfig") -> List[LayerSpec]:
    """The variant's stack, with gated memory slots on the layers `model.slots` names when it is enabled."""
    specs = get_variant(cfg.model.variant).layers(cfg)
    return [LayerSpec("slots", s.window) if i in cfg.derived.slot_layers else s for i, s in enumerate(specs)]


def check_slot_places(cfg: "RunConfig") -> None:
    """A one-line ConfigError, at config time, unless every layer `model.slots.layers` names is a
    sliding-window attention layer: the slots are that layer's gated state (docs/knobs.md#gated-memory-slots)."""
    specs = get_variant(cfg.model.variant).layers(cfg)
    for i in cfg.derived.slot_layers:
        spec = specs[i]
        if spec.kind != "attention" or spec.window is None:
            what = "a dense layer without a window" if spec.window is None else f"a '{spec.kind}' layer"
            row = get_variant(cfg.model.variant).row_name(cfg)
            raise ConfigError(f"'model.slots.layers' puts slots on layer {i} of row {row}, {what}; "
                              f"slots go on sliding-window attention layers (XL and Slide rows)")


def row_name(cfg: "RunConfig") -> str:
    """The paper's row name: "XL:512", "Slide:13L", "Full", ...; "+slots" with gated memory slots."""
    name = get_variant(cfg.model.variant).row_name(cfg)
    return f"{name}+slots" if cfg.derived.slot_layers else name


def sliding_stack(cfg: "RunConfig") -> List[LayerSpec]:
    """Every layer a sliding-window layer with an XL cache of W (docs/models.md#rows)."""
    return [LayerSpec("attention", window=cfg.model.window) for _ in range(cfg.model.num_layers)]


def dense_stack(cfg: "RunConfig") -> List[LayerSpec]:
    """Every layer dense causal attention over the segment, no carried state: the O(T^2) topline."""
    return [LayerSpec("attention", window=None) for _ in range(cfg.model.num_layers)]


# XL:W has N = W, so every block boundary is a cache boundary; Slide:LL has N = 8W with the same window.
register_variant("xl", sliding_stack, lambda cfg: f"XL:{cfg.model.window}", segment_invariant=True)
register_variant("slide", sliding_stack, lambda cfg: f"Slide:{cfg.model.num_layers}L", segment_invariant=True)
register_variant("full", dense_stack, lambda cfg: "Full")  # attends within its segment only


def _with_cells(cfg: "RunConfig", other: str) -> List[LayerSpec]:
    cells = set(cfg.derived.recurrent_layers)
    return [LayerSpec("recurrent" if i in cells else other, window=cfg.model.window)
            for i in range(cfg.model.num_layers)]


def recurrent_stack(cfg: "RunConfig") -> List[LayerSpec]:
    """The sliding stack with a block-recurrent cell at `model.recurrent.layers` (docs/models.md#placement)."""
    return _with_cells(cfg, "attention")


def feedback_stack(cfg: "RunConfig") -> List[LayerSpec]:
    """Every other layer also reads the cell's state before each block, block by block (docs/models.md#feedback)."""
    if len(cfg.derived.recurrent_layers) != 1:
        raise VariantError(f"a feedback row needs one recurrent layer, got model.recurrent.layers="
                           f"{list(cfg.model.recurrent.layers)}")
    return _with_cells(cfg, "feedback")


def _gates(cfg: "RunConfig") -> str:
    return f"{cfg.model.recurrent.gate}:{cfg.model.recurrent.topology}"


register_variant("rec", recurrent_stack, lambda cfg: f"Rec:{_gates(cfg)}", segment_invariant=True)
register_variant("feedback", feedback_stack, lambda cfg: f"Feedback:{_gates(cfg)}", segment_invariant=True)


def memorizing_stack(cfg: "RunConfig") -> List[LayerSpec]:
    """The XL stack with a kNN memory layer at `model.knn.layers` (docs/models.md#memorizing-transformer)."""
    memory = set(cfg.derived.knn_layers)
    if not memory:
        raise VariantError("the memorizing variant needs a memory layer: set model.knn.layers (e.g. [-4])")
    return [LayerSpec("memorizing" if i in memory else "attention", window=cfg.model.window)
            for i in range(cfg.model.num_layers)]


def _memory_label(size: int) -> str:
    """K_mem as the paper writes it: 65536 -> "64k"; a size that is not a multiple of 1024 as it is."""
    return f"{size // 1024}k" if size % 1024 == 0 else str(size)


# not segment-invariant: the memory takes a segment's keys only after the segment
register_variant("memorizing", memorizing_stack,
                 lambda cfg: f"Memorizing Trans. {_memory_label(cfg.model.knn.memory_size)}")
