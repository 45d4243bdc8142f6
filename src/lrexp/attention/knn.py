"""kNN retrieval from a per-lane memory of earlier keys, and attention over what it returns (docs/models.md#memorizing-transformer).

Pure functions of tensors; the memory layer (lrexp.layers.memorizing) owns the state and the parameters.

- `select(q, memory_k, count, k, backend)`: the memory slots of k entries per query and head, chosen by the
  score q-hat . k-hat (no scale) in fp32; slots at or beyond a lane's `count` are empty and score -1e6.
  `exact` is top-k, the reference; `bucket` is the official code's approximation: the memory viewed as k
  strided buckets {b, b+k, b+2k, ...} and the best entry of each taken, so a second-best entry sharing a
  bucket is missed. Both visit the memory in chunks: no score tensor exceeds `max_scores` elements.
- `gather(memory, slots)`: the retrieved rows; `memory_attention(q, keys, values, scale, backend)`: a softmax
  over the k retrieved items with the live query and the local attention's s_h, no bias and no mask.
- `ring_write(...)`: the segment's entries written at the pointer, the oldest overwritten when full.
- `recall_at_k(found, reference, count)`, `entry_age(slots, pointer, memory_size)`: the logged statistics.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from lrexp.attention.backends import attend
from lrexp.attention.mask import MaskSpec

MASKED_SCORE = -1e6  # an empty slot's score: below every real q-hat . k-hat in [-1, 1]
MAX_SCORES = 2 ** 26  # elements of one chunk's fp32 scores (256 MiB)


def _scores(q32: Tensor, memory_k: Tensor, count: Tensor, start: int, end: int) -> Tensor:
    """q-hat . k-hat [B, H, T, end - start] of q32 [B, H, T, D] against memory slots start..end-1 (fp32)."""
    s = torch.matmul(q32, memory_k[:, :, start:end].float().transpose(-1, -2))  # [B, H, T, C]
    empty = torch.arange(start, end, device=count.device)[None, :] >= count[:, None]  # [B, C]
    return s.masked_fill(empty[:, None, None, :], MASKED_SCORE)


def _chunk_slots(q: Tensor, max_scores: int) -> int:
    b, h, t, _ = q.shape
    return max(1, max_scores // (b * h * t))


def _exact(q32: Tensor, memory_k: Tensor, count: Tensor, k: int, max_scores: int) -> Tensor:
    """Top-k slots [B, H, T, k], merging each chunk's top-k into the running best."""
    b, h, t, _ = q32.shape
    size = memory_k.shape[2]
    chunk = max(_chunk_slots(q32, max_scores), k)
    best_s = q32.new_empty(b, h, t, 0)  # [B, H, T, <=k]
    best_i = torch.empty(b, h, t, 0, dtype=torch.int64, device=q32.device)
    for start in range(0, size, chunk):
        s = _scores(q32, memory_k, count, start, min(start + chunk, size))  # [B, H, T, C]
        top = s.topk(min(k, s.shape[-1]), dim=-1)
        cand_s = torch.cat([best_s, top.values], dim=-1)  # [B, H, T, <=2k]
        cand_i = torch.cat([best_i, top.indices + start], dim=-1)
        keep = cand_s.topk(min(k, cand_s.shape[-1]), dim=-1)
        best_s, best_i = keep.values, cand_i.gather(-1, keep.indices)
    return best_i


def _bucket(q32: Tensor, memory_k: Tensor, count: Tensor, k: int, max_scores: int) -> Tensor:
    """Slot r*k + b of the best row r of every bucket b [B, H, T, k] (memory_size a multiple of k)."""
    b, h, t, _ = q32.shape
    if memory_k.shape[2] % k:
        raise ValueError(f"bucket selection needs a memory size ({memory_k.shape[2]}) that k ({k}) divides")
    rows = memory_k.shape[2] // k  # slot = row * k + bucket
    per_chunk = max(1, _chunk_slots(q32, max_scores) // k)
    best_s = q32.new_full((b, h, t, k), float("-inf"))  # [B, H, T, k]
    best_r = torch.zeros(b, h, t, k, dtype=torch.int64, device=q32.device)
    for r0 in range(0, rows, per_chunk):
        r1 = min(r0 + per_chunk, rows)
        s = _scores(q32, memory_k, count, r0 * k, r1 * k).unflatten(-1, (r1 - r0, k))  # [B, H, T, rows, k]
        m, arg = s.max(dim=-2)  # [B, H, T, k]
        better = m > best_s  # ties keep the earlier (lower) row
        best_s = torch.where(better, m, best_s)
        best_r = torch.where(better, arg + r0, best_r)
    return best_r * k + torch.arange(k, device=q32.device)


SELECTORS: Dict[str, Callable[[Tensor, Tensor, Tensor, int, int], Tensor]] = {"exact": _exact, "bucket": _bucket}


@torch.no_grad()
def select(q: Tensor, memory_k: Tensor, count: Tensor, k: int, backend: str, max_scores: int = MAX_SCORES) -> Tensor:
    """Slots [B, H, T, k] int64 of the k entries retrieved for q [B, H, T, D] from memory_k [B, H, K_mem, D],
    slot j of lane b holding an entry iff j < count[b] ([B] int64). No gradient: selection uses the
    stop-gradient query."""
    if backend not in SELECTORS:
        raise ValueError(f"unknown kNN backend '{backend}'; available: {', '.join(sorted(SELECTORS))}")
    with torch.autocast(q.device.type, enabled=False):  # scores in fp32 whatever the compute dtype
        return SELECTORS[backend](q.float(), memory_k, count, k, max_scores)


def gather(memory: Tensor, slots: Tensor) -> Tensor:
    """The rows [B, H, T, k, D] of memory [B, H, K_mem, D] at slots [B, H, T, k]."""
    b, h, t, k = slots.shape
    idx = slots.reshape(b, h, t * k, 1).expand(-1, -1, -1, memory.shape[-1])  # [B, H, T*k, D]
    return memory.gather(2, idx).reshape(b, h, t, k, memory.shape[-1])


def memory_attention(q: Tensor, keys: Tensor, values: Tensor, scale: Tensor, backend: str = "reference") -> Tensor:
    """Y_mem [B, H, T, D] = softmax_k(s_h q-hat . K_ret) V_ret for q [B, H, T, D], the retrieved keys and values
    [B, H, T, k, D] (upcast from the storage dtype) and s_h [H]: no bias, no mask, no dropout. Empty slots
    take part (logit 0, value 0), so an empty memory gives Y_mem = 0.

    One `attend` call: every query is its own row of k keys, (H, T) folded into attend's head axis (views).
    """
    b, h, t, d = q.shape
    rows = (b, h * t, keys.shape[3], d)
    out = attend(q.reshape(b, h * t, 1, d), keys.to(q.dtype).reshape(rows), values.to(q.dtype).reshape(rows),
                 MaskSpec(causal=False), scale=scale.repeat_interleave(t), backend=backend)  # [B, H*T, 1, D]
    return out.reshape(b, h, t, d)


def ring_write(
    memory_k: Tensor, memory_v: Tensor, pointer: Tensor, count: Tensor, k: Tensor, v: Tensor
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The memory after writing k, v [B, H, T, D] (already detached and in the storage dtype) at each lane's
    pointer [B], wrapping around: (memory_k, memory_v, pointer, count). Functional: the inputs are untouched.
    A segment longer than the memory leaves only its newest K_mem tokens."""
    b, h, t, d = k.shape
    size = memory_k.shape[2]
    drop = max(t - size, 0)
    k, v = k[:, :, drop:], v[:, :, drop:]  # [B, H, T', D]
    slots = (pointer[:, None] + drop + torch.arange(t - drop, device=pointer.device)) % size  # [B, T']
    idx = slots[:, None, :, None].expand(b, h, t - drop, d)  # [B, H, T', D]
    return (memory_k.scatter(2, idx, k), memory_v.scatter(2, idx, v),
            (pointer + t) % size, (count + t).clamp(max=size))


def recall_at_k(found: Tensor, reference: Tensor, count: Tensor) -> Tensor:
    """Mean fraction of the reference's non-empty neighbours that `found` also holds: found and reference
    slots [B, H, T, k] (each query's slots distinct), count [B]. Per query |found & reference| over
    min(k, count), averaged over the queries of lanes whose memory is not empty (NaN if none is)."""
    k = reference.shape[-1]
    ref = reference.sort(dim=-1).values  # [B, H, T, k]
    pos = torch.searchsorted(ref, found.contiguous()).clamp(max=k - 1)  # [B, H, T, k]
    hit = (ref.gather(-1, pos) == found) & (found < count[:, None, None, None])
    per_query = hit.sum(-1).float() / count.clamp(min=1, max=k).float()[:, None, None]  # [B, H, T]
    return per_query[count > 0].mean()


def entry_age(slots: Tensor, pointer: Tensor, memory_size: int) -> Tensor:
    """Tokens written since each slot [B, H, T, k] was (1: the last token written), before this segment's
    write: slots fill in ring order, so the slot just behind the pointer [B] is the newest."""
    return (pointer[:, None, None, None] - 1 - slots) % memory_size + 1
