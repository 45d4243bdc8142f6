"""`full`: the unbounded multi-state, the topline. Nothing is evicted; rows leave only when they fall out of
the evaluation context T_eval (the window lifted to T_eval), so at the default T_eval = W it is the native
windowed model, and over a Full row's segment its dense attention."""

from __future__ import annotations

from torch import Tensor

from lrexp.cache.policy import Policy, register_policy


@register_policy
class Full(Policy):
    name = "full"
    budgeted = False

    observes = False

    def scores(self, previous: Tensor, probs: Tensor) -> Tensor:
        return previous  # unscored: never compared
