"""`tova`: Token Omission Via Attention. The rows' scores are the last query's probabilities, averaged over
heads at the default granularity `layer`, recomputed every step (nothing accumulates); the C best are kept in
temporal order. In block mode `policy.tova_score_query` picks the last query's row (the reference's), or
the block's mean or max (docs/cache-policies.md#block-mode, approximate)."""

from __future__ import annotations

from torch import Tensor

from lrexp.cache.policy import Policy, register_policy


@register_policy
class TOVA(Policy):
    name = "tova"

    def scores(self, previous: Tensor, probs: Tensor) -> Tensor:
        query = self.knobs.tova_score_query
        if query == "last":
            return probs[:, :, -1]  # [B, H, n]
        return probs.mean(2) if query == "mean_block" else probs.amax(2)  # [B, H, n]
