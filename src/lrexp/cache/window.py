"""`window`: Window(C), FIFO. Keeps the C most recent real rows: every score stays 0, so the tie rule evicts
the oldest. Under exclude-self Window(W) is the model's native sliding window (docs/cache-policies.md#policies)."""

from __future__ import annotations

from torch import Tensor

from lrexp.cache.policy import Policy, register_policy


@register_policy
class Window(Policy):
    name = "window"
    exact_block = True  # the kept set is the last C positions (plus the pinned ones), whatever the scores

    observes = False

    def scores(self, previous: Tensor, probs: Tensor) -> Tensor:
        return previous  # all 0: the oldest unpinned row goes first
