"""KV-cache policies: a transformer as a bounded multi-state RNN (docs/cache-policies.md).

A policy keeps at most C real-token rows per layer and lane (the budget) and decides which to evict. Each
policy is one module here that registers itself (`register_policy`); the shared machinery is the bounded
multi-state (`multistate`: rows, the tie rule, resets) and the decode (`decode`: a Full / XL / Slide model
token by token or block by block through its own layers). Adding a policy is one file and one import below.
"""

from lrexp.cache.policy import POLICIES, Policy, PolicyError, build_policy, register_policy

from lrexp.cache import full  # noqa: E402,F401  (registers "full")
from lrexp.cache import window  # noqa: E402,F401  (registers "window")
from lrexp.cache import sinks  # noqa: E402,F401  (registers "sinks")
from lrexp.cache import h2o  # noqa: E402,F401  (registers "h2o")
from lrexp.cache import tova  # noqa: E402,F401  (registers "tova")

__all__ = ["POLICIES", "Policy", "PolicyError", "build_policy", "register_policy"]
