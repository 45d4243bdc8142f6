"""Token-weighted language-model metrics (docs/models.md#metrics).

Every number is a ratio of sums reduced over lanes, batches and ranks: summed NLL (nats), summed target
tokens, summed target bytes. Averaging per-batch means would be wrong, because padded segments make batches
unequal. The loss by position in the document uses log-spaced buckets of each target's offset from its
document start (edges from the scale, `derived.position_buckets`, so every row of a grid shares them), so a
run shows whether long-range context is used. On a probe corpus the answer tokens get
a loss of their own: the probe's measurement, which the filler around them would drown in the mean.
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

    def __init__(self, bucket_edges: Sequence[int]) -> None:
        super().__init__()
        self.names = bucket_names(bucket_edges)
        self.register_buffer("edges", torch.tensor(list(bucket_edges), dtype=torch.long), persistent=False)
        # fp64 sums: a validation pass adds millions of per-token values
        for name in ("nll", "tokens", "bytes", "answer_nll", "answer_tokens"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("bucket_nll", "bucket_tokens"):
            self.add_state(name, torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, nll: Tensor, mask: Tensor, target_bytes: Tensor, doc_pos: Tensor, answer: Optional[Tensor] = None
    ) -> None:
        """nll [B, N] (0 where masked), mask [B, N] bool, target_bytes [B, N], doc_pos [B, N]; answer [B, N]
        bool on probe corpora (targets that are answer tokens, within mask)."""
        nll = nll.double()
        weight = mask.double()
        self.nll += nll.sum()
        self.tokens += weight.sum()
        self.bytes += (target_bytes * mask).sum().double()
        if answer is not None:
            self.answer_nll += (nll * answer).sum()
            self.answer_tokens += answer.sum().double()
        bucket = torch.bucketize(doc_pos, self.edges, right=True).flatten()  # [B*N] in 0..len(edges)
        # one-hot sums rather than index_add_, which has no deterministic CUDA kernel
        onehot = F.one_hot(bucket, len(self.names)).double()  # [B*N, K]
        self.bucket_nll += onehot.T @ nll.flatten()  # [K]
        self.bucket_tokens += onehot.T @ weight.flatten()  # [K]

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
        return out
