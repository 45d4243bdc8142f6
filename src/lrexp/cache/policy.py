"""The policy interface and registry.

A policy sees, after each step of a layer, the attention probabilities its queries gave to the real rows
(fp32, per lane and head; averaged over heads first at granularity `layer`) and turns them into one score
per row; the multi-state then evicts down to the budget by the shared tie rule (`multistate.evict`). What a
policy declares:

- `budgeted`: it takes a budget C (every policy but `full`);
- `default_granularity`: `layer` (one kept set per layer) or `head` (each head its own);
- `pinned`: rows at the start of the document that are never evicted (Window+i's sinks);
- `recent`: the most recent rows that are never evicted (H2O's recent window);
- `exact_block`: block mode can hide from each query the rows token mode would have evicted before it
  (true of the score-free FIFO policies, whose kept set is a function of the positions alone);
- `observes`, `scores(previous, probs)`: whether it reads the probabilities, and the rows' new scores;
- `accumulates`: its new scores are the previous ones plus the step's (H2O); else, when it observes, the
  last query's probabilities alone (TOVA). The token step (`cache.step`) reads the rule from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Dict, Optional, Type

from torch import Tensor

from lrexp.errors import UserError

if TYPE_CHECKING:
    from lrexp.config.schema import PolicyConfig


class PolicyError(UserError, ValueError):
    """An unknown policy, or a budget or knob a policy cannot take."""


class Policy(ABC):
    name: ClassVar[str]
    budgeted: ClassVar[bool] = True
    default_granularity: ClassVar[str] = "layer"
    exact_block: ClassVar[bool] = False
    observes: ClassVar[bool] = True  # its scores read the probabilities (the FIFO policies' do not)
    accumulates: ClassVar[bool] = False  # its scores add up over steps (H2O) instead of being replaced

    def __init__(self, budget: Optional[int], knobs: "PolicyConfig") -> None:
        if self.budgeted and (budget is None or budget < 1):
            raise PolicyError(f"policy '{self.name}' needs a budget C >= 1, got {budget}")
        if not self.budgeted and budget is not None:
            raise PolicyError(f"policy '{self.name}' takes no budget, got {budget}")
        self.budget = budget
        self.knobs = knobs
        self.granularity = knobs.granularity or self.default_granularity
        if budget is not None and self.pinned >= budget:
            raise PolicyError(f"policy '{self.name}' pins {self.pinned} rows (sinks + policy.protect_first_i), "
                              f"which needs a budget C > {self.pinned}, got {budget}")

    @property
    def pinned(self) -> int:
        return self.knobs.protect_first_i

    @property
    def recent(self) -> int:
        return 0

    @abstractmethod
    def scores(self, previous: Tensor, probs: Tensor) -> Tensor:
        """Scores [B, H, n] fp32 of the rows after a step: previous [B, H, n] (0 for the step's new rows) and
        probs [B, H, b, n] of the step's b queries over the rows (0 where a query does not see a row)."""

    def label(self) -> str:
        """The policy and budget as a table shows them: "tova:64", "full"."""
        return self.name if self.budget is None else f"{self.name}:{self.budget}"


POLICIES: Dict[str, Type[Policy]] = {}


def register_policy(cls: Type[Policy]) -> Type[Policy]:
    if cls.name in POLICIES:
        raise ValueError(f"cache policy '{cls.name}' is registered twice")
    POLICIES[cls.name] = cls
    return cls


def build_policy(name: str, budget: Optional[int], knobs: "PolicyConfig") -> Policy:
    if name not in POLICIES:
        raise PolicyError(f"unknown cache policy '{name}'; available: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](budget, knobs)
