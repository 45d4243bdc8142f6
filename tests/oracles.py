"""Oracles the equivalence tests share: plain, dense, one-pass computations with the reference backend that a
model's tiled, segmented, state-carrying forward must equal. A new variant's test imports them by name
(`from oracles import dense_oracle`; pytest puts tests/ on the path, pyproject.toml).
"""

import math

import torch

from lrexp.attention import MaskSpec, attend
from lrexp.layers.common import merge_heads
from lrexp.layers.recurrent import RecurrentLayer


def dense_oracle(model, tokens):
    """Logits [B, T, V] of the whole stream: layer by layer, one dense attention with the equivalent mask."""
    x = model.embed(tokens)  # [B, T, d]
    b = tokens.shape[0]
    for layer in model.layers:
        q, k, v = layer.qkv(x)  # [B, H, T, D]
        w = layer.window
        if w is not None:  # the first document's XL cache: w zero slots in front of the stream
            zeros = torch.zeros(b, q.shape[1], w, q.shape[-1])
            k, v = torch.cat([zeros, k], 2), torch.cat([zeros, v], 2)  # [B, H, w + T, D]
        mask = MaskSpec(window=w, include_self=layer.include_self)
        o = attend(q, k, v, mask, bias=layer.rel_bias(), scale=layer.scale(), backend="reference")
        x = layer.ffn(x + layer.wo(merge_heads(o)))
    return model.norm_f(x) @ model.embed.weight.t() / math.sqrt(model.vocab_size)


def reference_cell(cell: RecurrentLayer, x, c, k_prev, v_prev):
    """The cell one block at a time, every attention dense with the reference backend: block t's tokens
    attend to [previous block; block t] and to c_t, then c_t is updated (docs/models.md#four-attentions, eval mode).

    The memory slots' options too (docs/knobs.md#gated-memory-slots): no P without the states' self-attention, R over
    the current block alone, and the `prefix_kv` read as one softmax written out here by hand."""
    w, heads = cell.window, cell.num_heads
    outputs = []
    for xb in x.split(w, dim=1):  # [B, W, d]
        h = cell.qkv.norm_input(xb)
        q, k, v = cell.qkv.project(h)  # [B, H, W, D]
        k2, v2 = torch.cat([k_prev, k], 2), torch.cat([v_prev, v], 2)  # [B, H, 2W, D]
        q_s, k_s, v_s, q_e = cell.state(c)
        if cell.read == "prefix_kv":
            o = _prefix_window(q, k_s, v_s, k2, v2, cell)
        else:
            q2 = torch.nn.functional.normalize(cell.wq2(h).view(*h.shape[:2], heads, -1).transpose(1, 2), dim=-1, eps=0)
            a = attend(q, k2, v2, MaskSpec(window=w), bias=cell.rel_bias(), scale=cell.scale(), backend="reference")
            b = attend(q2, k_s, v_s, MaskSpec(causal=False), scale=cell.scale2(), backend="reference")
            o = torch.cat([a, b], 1)
        outputs.append(cell.ffn(xb + cell.wo(merge_heads(o))))
        k_r, v_r = (k2, v2) if cell.reads_prev_block else (k, v)
        u = [attend(q_e, k_r, v_r, MaskSpec(causal=False), scale=cell.state_scale2(), backend="reference")]
        if q_s is not None:
            u.insert(0, attend(q_s, k_s, v_s, MaskSpec(causal=False), scale=cell.state_scale(), backend="reference"))
        c = cell.update(c, merge_heads(torch.cat(u, 1)))
        k_prev, v_prev = k, v
    return torch.cat(outputs, 1), c


def _prefix_window(q, k_s, v_s, k2, v2, cell):
    """Block queries q [B, H, W, D] over [slot keys; previous and current block] in one softmax: the window's
    logits with the T5 bias and the window mask, the slots' without either."""
    w, s = cell.window, cell.scale()[:, None, None]  # s_h [H, 1, 1]
    window = (torch.einsum("bhqd,bhkd->bhqk", q, k2) + cell.rel_bias().dense(w, 2 * w)) * s  # [B, H, W, 2W]
    window = window.masked_fill(~MaskSpec(window=w).visible(w, 2 * w, q.device)[:, None], float("-inf"))
    slots = torch.einsum("bhqd,bhkd->bhqk", q, k_s) * s  # [B, H, W, n]
    probs = torch.cat([slots, window], -1).softmax(-1)
    return probs @ torch.cat([v_s, v2], 2)  # [B, H, W, D]
