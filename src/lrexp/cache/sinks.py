"""`sinks`: Window+i(C), attention sinks (StreamingLLM): the first i real rows of the current document stay
for good, plus the C - i most recent. i is `policy.sinks` (4, StreamingLLM's start size); after a document
reset the sinks are the new document's first rows."""

from __future__ import annotations

from lrexp.cache.policy import register_policy
from lrexp.cache.window import Window


@register_policy
class Sinks(Window):
    name = "sinks"

    @property
    def pinned(self) -> int:
        return self.knobs.sinks + self.knobs.protect_first_i
