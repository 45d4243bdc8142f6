"""`h2o`: heavy hitters plus a recent window (H2O). C = r + h; the r most recent rows are kept, and among the
others the row with the lowest accumulated attention goes first. Scores are per lane (the reference sums
over the batch, wrong for B > 1) and per head at the default granularity; a new row starts at what its own
query gave it (0 under exclude-self) and kept rows keep theirs."""

from __future__ import annotations

from torch import Tensor

from lrexp.cache.policy import Policy, PolicyError, register_policy


@register_policy
class H2O(Policy):
    name = "h2o"
    default_granularity = "head"
    accumulates = True

    def __init__(self, budget, knobs) -> None:
        super().__init__(budget, knobs)
        self.heavy = budget // 2 if knobs.h2o_heavy is None else knobs.h2o_heavy
        if self.heavy > budget:
            raise PolicyError(f"policy.h2o_heavy ({self.heavy}) must be <= the budget C ({budget})")

    @property
    def recent(self) -> int:
        return self.budget - self.heavy

    def scores(self, previous: Tensor, probs: Tensor) -> Tensor:
        return previous + probs.sum(2)  # [B, H, n]: the column sums of the step's queries
