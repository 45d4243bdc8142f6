"""Token-weighted language-model metrics (docs/models.md#metrics).

Every number is a ratio of sums reduced over lanes, batches and ranks: summed NLL (nats), summed target
tokens, summed target bytes. Averaging per-batch means would be wrong, because padded segments make batches
unequal. The loss by position in the document uses log-spaced buckets of each target's offset from its
document start (edges from the scale, `derived.position_buckets`, so every row of a grid shares them), so a
run shows whether long-range context is used. On a probe corpus the answer tokens get
a loss of their own: the probe's measurement, which the filler around them would drown in the mean. On a
mention corpus (docs/data.md#the-cast-corpus) the tokens of a name get a loss by the distance back to the
name's previous mention (log-spaced buckets from the scale's window, `mention_buckets`), next to the loss
on first mentions: the reference for a model that cannot see the earlier mention.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

LN2 = math.log(2.0)


def bucket_names(edges: Sequence[int]) -> List[str]:
    """"0-64", "64-256", ..., and the open last bucket by its lower end alone ("1024"): MLflow rejects
    metric names holding "+", and a run that reaches that bucket would fail on logging it."""
    lows = [0, *edges]
    return [f"{lo}-{hi}" for lo, hi in zip(lows, edges)] + [f"{edges[-1]}"]


MENTION_FIRST = "first"  # the bucket of first mentions (mention_dist < 0)


def mention_buckets(window: int) -> List[int]:
    """Distance edges W, 4W, 16W, 64W, 256W: inside one window, a few windows (a sliding window's layers
    reach), a segment or two, many segments."""
    return [window * 4**k for k in range(5)]


def token_nll(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Per-token NLL in nats, 0 where masked. logits [B, N, V], labels [B, N], mask [B, N] -> [B, N] fp32."""
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))  # padding labels may be out of range
    nll = F.cross_entropy(logits.flatten(0, 1).float(), safe_labels.flatten(), reduction="none")  # [B*N]
    return nll.view_as(labels) * mask  # [B, N]


class TokenStats(Metric):
    """Sums for one stage: NLL, target tokens, target bytes, NLL and tokens per position bucket, and NLL and
    tokens of probe answers.

    `compute()` returns the ratios (loss in nats, bits/token, bits/byte, token perplexity, bits/token per
    bucket, bits/token of the answers); torchmetrics reduces the sums across ranks before that.
    """

    full_state_update = False

    def __init__(self, bucket_edges: Sequence[int], mention_edges: Sequence[int] = (1,)) -> None:
        super().__init__()
        self.names = bucket_names(bucket_edges)
        self.register_buffer("edges", torch.tensor(list(bucket_edges), dtype=torch.long), persistent=False)
        self.mention_names = [MENTION_FIRST, *bucket_names(mention_edges)]
        self.register_buffer("mention_edges", torch.tensor(list(mention_edges), dtype=torch.long), persistent=False)
        for name in ("mention_nll", "mention_tokens"):
            self.add_state(name, torch.zeros(len(self.mention_names), dtype=torch.float64), dist_reduce_fx="sum")
        # fp64 sums: a validation pass adds millions of per-token values
        for name in ("nll", "tokens", "bytes", "answer_nll", "answer_tokens"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("bucket_nll", "bucket_tokens"):
            self.add_state(name, torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, nll: Tensor, mask: Tensor, target_bytes: Tensor, doc_pos: Tensor, answer: Optional[Tensor] = None,
        mention: Optional[Tensor] = None,
    ) -> None:
        """nll [B, N] (0 where masked), mask [B, N] bool, target_bytes [B, N], doc_pos [B, N]; answer [B, N]
        bool on probe corpora (targets that are answer tokens, within mask); mention [B, N] int64 on mention
        corpora (0 off a name, < 0 a first mention, else the distance to the previous mention)."""
        nll = nll.double()
        weight = mask.double()
        self.nll += nll.sum()
        self.tokens += weight.sum()
        self.bytes += (target_bytes * mask).sum().double()
        if answer is not None:
            self.answer_nll += (nll * answer).sum()
            self.answer_tokens += answer.sum().double()
        bucket = torch.bucketize(doc_pos, self.edges, right=True).flatten()  # [B*N] in 0..len(edges)
        self.bucket_nll += _bucket_sums(bucket, nll.flatten(), len(self.names))  # [K]
        self.bucket_tokens += _bucket_sums(bucket, weight.flatten(), len(self.names))  # [K]
        if mention is not None:
            on_name = (mention != 0).flatten().double()  # [B*N]
            # bucket 0: first mentions; 1..: re-mentions by distance (a distance is >= 1)
            slot = torch.where(mention < 0, 0, torch.bucketize(mention, self.mention_edges, right=True) + 1).flatten()
            self.mention_nll += _bucket_sums(slot, nll.flatten() * on_name, len(self.mention_names))
            self.mention_tokens += _bucket_sums(slot, on_name, len(self.mention_names))

    def compute(self) -> Dict[str, Tensor]:
        loss = self.nll / self.tokens
        out = {
            "targets": self.tokens,  # scored targets: equal across the rows of a grid in a final pass
            "loss": loss,
            "bits_per_token": loss / LN2,
            "bits_per_byte": self.nll / (LN2 * self.bytes),
            "ppl": torch.exp(loss),  # = 2 ** bits_per_token
        }
        for i, name in enumerate(self.names):
            if self.bucket_tokens[i] > 0:  # buckets a short run never reaches are left out, not logged as NaN
                out[f"bits_per_token_by_pos/{name}"] = self.bucket_nll[i] / (LN2 * self.bucket_tokens[i])
        if self.answer_tokens > 0:  # probe corpora only
            out["answer_bits_per_token"] = self.answer_nll / (LN2 * self.answer_tokens)
        for i, name in enumerate(self.mention_names):  # mention corpora only
            if self.mention_tokens[i] > 0:
                out[f"mention_bits_per_token/{name}"] = self.mention_nll[i] / (LN2 * self.mention_tokens[i])
                out[f"mention_targets/{name}"] = self.mention_tokens[i]
        return out


def _bucket_sums(bucket: Tensor, values: Tensor, buckets: int) -> Tensor:
    """[K] sums of values [M] (fp64) per bucket [M]: one-hot sums rather than index_add_, which has no
    deterministic CUDA kernel."""
    return F.one_hot(bucket, buckets).double().T @ values
