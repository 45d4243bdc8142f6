"""The carried state: an explicit, typed value, never a module attribute or buffer (docs/design.md#carried-state).

`ModelState` holds one entry per layer: a `LayerState` of the kind that layer carries, or None for a
stateless layer. A layer state kind is a frozen dataclass of tensors whose first dimension is the lane:

- `reset_rows(doc_start)` gives lanes flagged [B] a fresh state. A kind whose fresh value needs parameters
  (a learned initial state) only raises its per-lane `fresh` flag here; the owning layer substitutes the
  parameter at its next forward and clears the flag. Kinds whose fresh value is a constant may also set
  it here (the XL cache is zeroed at once).
- `detach()`, `lanes(index)`, `cat(parts)`, `to(device)`, `to_tensors()`, `from_tensors()` work field by
  field.
- `cast(dtype)` converts the carried floating-point fields, the storage dtype of `model.state_dtype`
  (docs/knobs.md#state-storage-dtype); fields named in a kind's `own_dtype` keep the dtype their layer chose (the kNN memory's),
  and the bool / integer bookkeeping (`fresh`, pointers) is never converted.

A new kind is one `@register_state` dataclass here with a unique `kind` name (the checkpoint key).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import torch
from torch import Tensor

from lrexp.errors import UserError

S = TypeVar("S", bound="LayerState")
X = TypeVar("X", bound="XLCache")

# The storage dtypes of carried state (model.state_dtype, model.knn.state_dtype), by config name.
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StateError(UserError, ValueError):
    """A carried state that does not fit the model or the batch."""


def _check_doc_start(doc_start: Tensor, batch_size: int) -> None:
    if doc_start.dtype != torch.bool or doc_start.shape != (batch_size,):
        raise StateError(
            f"doc_start must be a bool tensor [{batch_size}], got {doc_start.dtype} {tuple(doc_start.shape)}"
        )


@dataclass(frozen=True)
class LayerState:
    """Base of every per-layer state kind: tensor fields, lane first, plus the [B] bool `fresh` flag."""

    kind: ClassVar[str]
    own_dtype: ClassVar[Tuple[str, ...]] = ()  # fields stored in a dtype of the layer's, which `cast` keeps
    fresh: Tensor  # [B] bool: the lane starts a document and has not been through its layer since

    @property
    def batch_size(self) -> int:
        return self.fresh.shape[0]

    def reset_rows(self: S, doc_start: Tensor) -> S:
        _check_doc_start(doc_start, self.batch_size)
        return replace(self, fresh=self.fresh | doc_start.to(self.fresh.device))

    def detach(self: S) -> S:
        return replace(self, **{f.name: getattr(self, f.name).detach() for f in fields(self)})

    def lanes(self: S, index: slice) -> S:
        """The state of the lanes `index` selects (every field is lane-first)."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self: S, device) -> S:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def carried(self) -> Dict[str, Tensor]:
        """The fields `cast` converts: floating point and not in `own_dtype`."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in self.own_dtype and getattr(self, f.name).is_floating_point()}

    def cast(self: S, dtype: torch.dtype) -> S:
        """The state with its carried fields in `dtype` (the same tensors where they already are)."""
        return replace(self, **{name: t.to(dtype) for name, t in self.carried().items()})

    @classmethod
    def cat(cls: Type[S], parts: Sequence[S]) -> S:
        """One state of the lanes of `parts`, in order."""
        return replace(parts[0], **{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def to_tensors(self) -> Dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls: Type[S], tensors: Dict[str, Tensor]) -> S:
        names = {f.name for f in fields(cls)}
        if set(tensors) != names:
            raise StateError(f"a {cls.kind} state needs tensors {sorted(names)}, got {sorted(tensors)}")
        return cls(**tensors)


STATE_KINDS: Dict[str, Type[LayerState]] = {}


def register_state(cls: Type[S]) -> Type[S]:
    if cls.kind in STATE_KINDS:
        raise ValueError(f"state kind '{cls.kind}' is registered twice")
    STATE_KINDS[cls.kind] = cls
    return cls


@register_state
@dataclass(frozen=True)
class XLCache(LayerState):
    """The normalised keys k-hat and values of a layer's last W tokens (docs/models.md#xl-cache).

    A reset zeroes the lane's slots at once (3.6: zero K/V, visible by default); `fresh` tells the layer
    they are empty, so `attn.mask_empty_cache` can hide them.
    """

    kind: ClassVar[str] = "xl"
    k: Tensor  # [B, H, W, D]
    v: Tensor  # [B, H, W, D]

    @classmethod
    def empty(cls, batch_size: int, num_heads: int, window: int, head_dim: int, device) -> "XLCache":
        zeros = torch.zeros(batch_size, num_heads, window, head_dim, device=device)
        return cls(fresh=torch.ones(batch_size, dtype=torch.bool, device=device), k=zeros, v=zeros.clone())

    def advance(self: X, k: Tensor, v: Tensor, **others: Tensor) -> X:
        """The carry after a segment with keys k-hat and values v [B, H, T, D]: their last W (the cache's
        width), no lane fresh any more; `others`: a subclass's own fields, new too."""
        w = self.k.shape[2]
        return replace(self, fresh=torch.zeros_like(self.fresh), k=k[:, :, -w:], v=v[:, :, -w:], **others)

    def reset_rows(self, doc_start: Tensor) -> "XLCache":
        _check_doc_start(doc_start, self.batch_size)
        lanes = doc_start.to(self.k.device)[:, None, None, None]  # [B, 1, 1, 1]
        return replace(
            self,
            fresh=self.fresh | doc_start.to(self.fresh.device),
            k=self.k.masked_fill(lanes, 0.0),
            v=self.v.masked_fill(lanes, 0.0),
        )


C = TypeVar("C", bound="CellState")


@dataclass(frozen=True)
class CellState(XLCache):
    """The carry of a gated state cell (lrexp.layers.recurrent): its token attention's XL cache plus the state
    c [B, S, d] before the segment's first block. Not a kind itself: the Rec rows' cell and the memory slots
    each register theirs, so a checkpoint and a per-kind knob tell them apart.

    A reset zeroes the cache like any XL cache and only flags the lane: the layer then replaces c by its
    learned initial state c_init, which a constant here could not be (it needs gradient).
    """

    c: Tensor  # [B, S, d]

    @classmethod
    def initial(cls: Type[C], cache: XLCache, num_states: int, d_model: int) -> C:
        """Every lane fresh: an empty cache, and a c that is never read before c_init replaces it."""
        c = cache.k.new_zeros(cache.batch_size, num_states, d_model)  # [B, S, d]
        return cls(fresh=cache.fresh, k=cache.k, v=cache.v, c=c)


@register_state
@dataclass(frozen=True)
class RecurrentState(CellState):
    """The block-recurrent cell's carry (docs/models.md#state-state-ids-and-the-initial-state, docs/models.md#carry-and-order-of-computation): c holds its S states."""

    kind: ClassVar[str] = "recurrent"


@register_state
@dataclass(frozen=True)
class SlotState(CellState):
    """A layer's gated memory slots (docs/knobs.md#gated-memory-slots): c holds M [B, n, d]."""

    kind: ClassVar[str] = "slots"


@register_state
@dataclass(frozen=True)
class KNNMemory(XLCache):
    """The kNN memory layer's carry (docs/models.md#memorizing-transformer): its local attention's XL cache plus a ring buffer of the
    document's earlier (k-hat, v) per (lane, head), stored in the layer's `state_dtype`.

    Slots fill from 0, so slot j of lane b holds an entry iff j < count[b]; pointer[b] is the next slot
    written. A reset zeroes the lane's cache, keys and values and sets its pointer and count to 0 at once
    (6 step 1); the other lanes keep theirs.
    """

    kind: ClassVar[str] = "knn"
    own_dtype: ClassVar[Tuple[str, ...]] = ("memory_k", "memory_v")  # model.knn.state_dtype
    memory_k: Tensor  # [B, H, K_mem, D]
    memory_v: Tensor  # [B, H, K_mem, D]
    pointer: Tensor  # [B] int64
    count: Tensor  # [B] int64

    @classmethod
    def initial(cls, cache: XLCache, memory_size: int, dtype: torch.dtype) -> "KNNMemory":
        """Every lane fresh: an empty cache and an empty memory."""
        b, h, _, d = cache.k.shape
        memory = torch.zeros(b, h, memory_size, d, dtype=dtype, device=cache.k.device)  # [B, H, K_mem, D]
        empty = torch.zeros(b, dtype=torch.int64, device=cache.k.device)  # [B]
        return cls(fresh=cache.fresh, k=cache.k, v=cache.v, memory_k=memory, memory_v=memory.clone(),
                   pointer=empty, count=empty.clone())

    def reset_rows(self, doc_start: Tensor) -> "KNNMemory":
        cache = super().reset_rows(doc_start)
        lanes = doc_start.to(self.memory_k.device)  # [B]
        return replace(
            cache,
            memory_k=self.memory_k.masked_fill(lanes[:, None, None, None], 0.0),
            memory_v=self.memory_v.masked_fill(lanes[:, None, None, None], 0.0),
            pointer=self.pointer.masked_fill(lanes, 0),
            count=self.count.masked_fill(lanes, 0),
        )


@dataclass(frozen=True)
class ModelState:
    """The carried state of every layer, index-aligned with the model's layers (None: stateless layer).

    `stats`: what the segment that produced this state measured, for the training log (lrexp.model.lm's
    forward). No layer reads it and checkpoints leave it out: it is not carried."""

    layers: Tuple[Optional[LayerState], ...]
    batch_size: int
    stats: Mapping[str, Union[Tensor, float]] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for i, s in enumerate(self.layers):
            if s is not None and s.batch_size != self.batch_size:
                raise StateError(f"layer {i}'s state has {s.batch_size} lanes, the model state {self.batch_size}")

    def reset_rows(self, doc_start: Tensor) -> "ModelState":
        """Lanes flagged in doc_start [B] get a fresh state in every layer; the others are untouched."""
        _check_doc_start(doc_start, self.batch_size)
        return replace(self, layers=tuple(s if s is None else s.reset_rows(doc_start) for s in self.layers))

    def detach(self) -> "ModelState":
        return replace(self, layers=tuple(s if s is None else s.detach() for s in self.layers))

    def lanes(self, index: slice) -> "ModelState":
        """The state of the lanes `index` selects, say the first n of an evaluation batch that shrinks."""
        layers = tuple(s if s is None else s.lanes(index) for s in self.layers)
        return ModelState(layers=layers, batch_size=len(range(*index.indices(self.batch_size))))

    def split(self, parts: int) -> Tuple["ModelState", ...]:
        """`parts` states of equal consecutive lane groups (the inverse of `cat`)."""
        size = self.batch_size // parts
        return tuple(self.lanes(slice(i * size, (i + 1) * size)) for i in range(parts))

    @classmethod
    def cat(cls, parts: Sequence["ModelState"]) -> "ModelState":
        """One state of the lanes of `parts`, in order (lane groups into the rank's lanes)."""
        layers = tuple(None if s is None else type(s).cat([p.layers[i] for p in parts])
                       for i, s in enumerate(parts[0].layers))
        return cls(layers=layers, batch_size=sum(p.batch_size for p in parts))

    def to(self, device) -> "ModelState":
        return replace(self, layers=tuple(s if s is None else s.to(device) for s in self.layers))

    def cast(self, dtype: torch.dtype) -> "ModelState":
        """Every layer's carried fields in `dtype`: fp32 to compute with, the storage dtype between steps."""
        return replace(self, layers=tuple(s if s is None else s.cast(dtype) for s in self.layers))

    def store(self, dtype: torch.dtype) -> "ModelState":
        """`cast(dtype)` for keeping between steps (docs/knobs.md#state-storage-dtype). A value the dtype cannot hold (fp16 overflows
        above 65504) fails here, naming the layer and field, instead of carrying inf into the next step."""
        stored = self.cast(dtype)
        if dtype != torch.float32:
            for i, s in enumerate(stored.layers):
                for name, t in ({} if s is None else s.carried()).items():
                    if not bool(torch.isfinite(t).all()):
                        raise StateError(f"layer {i}'s carried {s.kind} state '{name}' is not finite in {dtype} "
                                         f"storage (model.state_dtype); float16 overflows above 65504, bfloat16 "
                                         f"does not")
        return stored

    def carried_bytes(self) -> int:
        """Bytes of the carried floating-point fields of all lanes (the kNN memory included; flags not)."""
        total = 0
        for s in self.layers:
            if s is not None:
                total += sum(t.numel() * t.element_size() for t in s.to_tensors().values() if t.is_floating_point())
        return total

    def to_tensors(self) -> Dict[str, Tensor]:
        """Flat tensors for checkpoints: `layers.<i>.<kind>.<field>` plus the layer count and lanes."""
        out = {
            "num_layers": torch.tensor([len(self.layers)]),
            "batch_size": torch.tensor([self.batch_size]),
        }
        for i, s in enumerate(self.layers):
            if s is not None:
                out.update({f"layers.{i}.{s.kind}.{name}": t for name, t in s.to_tensors().items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Dict[str, Tensor]) -> "ModelState":
        try:
            num_layers = int(tensors["num_layers"].reshape(-1)[0])
            batch_size = int(tensors["batch_size"].reshape(-1)[0])
        except KeyError as exc:
            raise StateError(f"not a saved ModelState: no '{exc.args[0]}' tensor") from None
        parts: Dict[Tuple[int, str], Dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key in ("num_layers", "batch_size"):
                continue
            head, index, kind, name = (key.split(".", 3) + ["", "", ""])[:4]
            if head != "layers" or not index.isdigit() or kind not in STATE_KINDS or not name:
                raise StateError(f"not a saved ModelState: unexpected tensor '{key}'")
            parts.setdefault((int(index), kind), {})[name] = value
        layers: list[Optional[LayerState]] = [None] * num_layers
        for (index, kind), part in parts.items():
            if index >= num_layers or layers[index] is not None:
                raise StateError(f"not a saved ModelState: layer {index} is out of range or saved twice")
            layers[index] = STATE_KINDS[kind].from_tensors(part)
        return cls(layers=tuple(layers), batch_size=batch_size)
