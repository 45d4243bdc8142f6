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
    attend to [previous block; block t] and to c_t, then c_t is updated (models.md 4.3-4.6, eval mode)."""
    w, heads = cell.window, cell.num_heads
    outputs = []
    for xb in x.split(w, dim=1):  # [B, W, d]
        h = cell.qkv.norm_input(xb)
        q, k, v = cell.qkv.project(h)  # [B, H, W, D]
        q2 = torch.nn.functional.normalize(cell.wq2(h).view(*h.shape[:2], heads, -1).transpose(1, 2), dim=-1, eps=0)
        k2, v2 = torch.cat([k_prev, k], 2), torch.cat([v_prev, v], 2)  # [B, H, 2W, D]
        a = attend(q, k2, v2, MaskSpec(window=w), bias=cell.rel_bias(), scale=cell.scale(), backend="reference")
        q_s, k_s, v_s, q_e = cell.state(c)
        b = attend(q2, k_s, v_s, MaskSpec(causal=False), scale=cell.scale2(), backend="reference")
        p = attend(q_s, k_s, v_s, MaskSpec(causal=False), scale=cell.state_scale(), backend="reference")
        r = attend(q_e, k2, v2, MaskSpec(causal=False), scale=cell.state_scale2(), backend="reference")
        outputs.append(cell.ffn(xb + cell.wo(merge_heads(torch.cat([a, b], 1)))))
        c = cell.update(c, merge_heads(torch.cat([p, r], 1)))
        k_prev, v_prev = k, v
    return torch.cat(outputs, 1), c
