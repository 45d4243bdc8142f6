"""The kNN memory layer (kind "memorizing", docs/models.md#memorizing-transformer): a sliding-window layer with an XL cache whose
attention also reads a per-lane memory of the document's earlier keys and values.

Per segment, in this order: (1) lanes starting a document arrive with an empty memory (`KNNMemory.reset_rows`
empties it with the cache); (2) every query retrieves k entries per head (lrexp.attention.knn, selection
with the stop-gradient q-hat); (3) Y_mem is a softmax over them with the live query and the local s_h;
(4) Y_local and Y_mem are combined per head (`knn.combine`); W_O and the FFN follow; (5) the segment's
keys and values are written, detached, into the ring buffer. The write comes after the retrieval, so a
segment never retrieves its own tokens.

`layer(x, state, stats={})` (the model's `measure`, on the trainer's logging steps) also fills the dict
with recall@k of the bucket selection against exact search and the mean age of the retrieved entries:
plain floats for the log, never part of the carried state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from lrexp.attention.knn import entry_age, gather, memory_attention, recall_at_k, ring_write, select
from lrexp.layers.block import AttentionLayer
from lrexp.layers.common import merge_heads
from lrexp.layers.registry import LayerSpec, register_layer
from lrexp.model.flops import Flops, linear_flops
from lrexp.model.state import STATE_DTYPES, KNNMemory, StateError

if TYPE_CHECKING:
    from lrexp.config.schema import RunConfig


def _weighted_mean(local: Tensor, mem: Tensor, gate_bias: Optional[Tensor]) -> Tensor:
    g = torch.sigmoid(gate_bias).to(local.dtype)[:, None, None]  # [H, 1, 1]: g_h = sigma(b_h)
    return (1 - g) * local + g * mem


def _add(local: Tensor, mem: Tensor, gate_bias: Optional[Tensor]) -> Tensor:
    return local + mem


def _stop_forward(local: Tensor, mem: Tensor, gate_bias: Optional[Tensor]) -> Tensor:
    # the 2025 code's STOP_FORWARD: the output is Y_mem, while Y_local still receives the gradient
    return mem + (local - local.detach())


# (Y_local, Y_mem [B, H, T, D], b_h [H] or None) -> Y [B, H, T, D]
COMBINE: Dict[str, Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]] = {
    "weighted_mean": _weighted_mean, "add": _add, "stop_forward": _stop_forward,
}


class MemorizingLayer(AttentionLayer):
    """`layer(x, state) -> (x, new_state)` with state a `KNNMemory` (lrexp.model's layer interface)."""

    stats_prefix: ClassVar[Optional[str]] = "knn"

    def __init__(self, spec: LayerSpec, cfg: "RunConfig", backend: str) -> None:
        if spec.window is None:
            raise ValueError("a 'memorizing' layer needs a window: its local attention is the XL layer's")
        super().__init__(spec, cfg, backend)
        knn = cfg.model.knn
        self.memory_size = knn.memory_size
        self.k = knn.k
        self.selection = knn.backend
        self.combine = knn.combine
        self.state_dtype = STATE_DTYPES[knn.state_dtype]
        if not knn.local_position_bias:
            self.rel_bias = None  # the 2025 code: no T5 bias on the memory layer's local attention
        # b_h, initialised to 0 (g = 0.5); only the weighted mean has a gate
        self.gate_bias = nn.Parameter(torch.zeros(self.num_heads)) if knn.combine == "weighted_mean" else None

    def initial_state(self, batch_size: int, device) -> KNNMemory:
        return KNNMemory.initial(super().initial_state(batch_size, device), self.memory_size, self.state_dtype)

    def forward(
        self, x: Tensor, state: KNNMemory, stats: Optional[Dict[str, float]] = None
    ) -> Tuple[Tensor, KNNMemory]:
        """`stats`: a dict to fill with this forward's retrieval statistics (`_stats`)."""
        local, q, k, v = self.self_attention(x, state)  # [B, H, T, D] each
        slots = select(q.detach(), state.memory_k, state.count, self.k, self.selection)  # [B, H, T, k]
        keys, values = gather(state.memory_k, slots), gather(state.memory_v, slots)  # [B, H, T, k, D]
        mem = memory_attention(q, keys, values, self.scale(), self.backend)  # [B, H, T, D]
        if stats is not None:
            stats.update(self._stats(q, state, slots))
        y = COMBINE[self.combine](local, mem, self.gate_bias)  # [B, H, T, D]
        x = x + self.wo(merge_heads(y))
        memory_k, memory_v, pointer, count = ring_write(
            state.memory_k, state.memory_v, state.pointer, state.count, self._store(k), self._store(v)
        )
        new_state = state.advance(k, v, memory_k=memory_k, memory_v=memory_v, pointer=pointer, count=count)
        return self.ffn(x), new_state

    def flops(self, t: int, states: int) -> Flops:
        """The band T W and the T k retrieved entries; the search scores every slot, 2 d per (query, slot)."""
        search = 2 * self.num_heads * self.head_dim * t * self.memory_size
        return Flops(linear_flops(self) * t, self.pair_flops * (t * self.window + t * self.k), search)

    def _store(self, x: Tensor) -> Tensor:
        """x [B, H, T, D] detached in the storage dtype; fp16 can overflow, which fails here (docs/knobs.md#state-storage-dtype)."""
        stored = x.detach().to(self.state_dtype)
        if self.state_dtype == torch.float16 and not torch.isfinite(stored).all():
            raise StateError("a kNN memory entry overflows float16; use model.knn.state_dtype=bfloat16")
        return stored

    @torch.no_grad()
    def _stats(self, q: Tensor, state: KNNMemory, slots: Tensor) -> Dict[str, float]:
        """recall_at_k (bucket selection only) and age_steps, the mean age in segments (optimiser steps) of
        the retrieved entries; nothing while every lane's memory is empty."""
        count = state.count
        if not bool((count > 0).any()):
            return {}
        stats = {}
        if self.selection != "exact":
            exact = select(q, state.memory_k, count, self.k, "exact")  # [B, H, T, k]
            stats["recall_at_k"] = float(recall_at_k(slots, exact, count))
        t = q.shape[2]
        age = (entry_age(slots, state.pointer, self.memory_size) - 1) // t + 1  # [B, H, T, k] segments
        stats["age_steps"] = float(age[slots < count[:, None, None, None]].float().mean())
        return stats


register_layer("memorizing", MemorizingLayer)
