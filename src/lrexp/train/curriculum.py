"""The window / segment-length curriculum (docs/knobs.md#window-curriculum, `curriculum.stages`): the stages of a run.

Stage i trains from its start step with window W_i and segments of N_i = R_i x W_i tokens in
data.tokens_per_step / N_i lanes, so every step reads the same tokens and the LR schedule simply continues.
At a stage's first step the data lanes are rebuilt for the new N and lane count and every lane restarts
with a fresh state (its XL cache has the new W); the stage's stream reads its own shuffles of the
documents (epochs from i x STAGE_EPOCHS), so a stage does not re-read the documents the one before began
with. The last stage is the model's own window and segment, the ones evaluation and the control run at.

Without a curriculum nothing here is used: the run is the one stage of its config, read by the plain stream.
The config's checks (lrexp.config) guarantee whole lanes on every rank and lane group and increasing starts.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, List

if TYPE_CHECKING:
    from lrexp.config.schema import RunConfig

STAGE_EPOCHS = 1 << 20  # stage i's stream shuffles with epochs i x STAGE_EPOCHS, ...: its own document orders


@dataclass(frozen=True)
class Stage:
    start_step: int
    window: int
    segment_len: int
    lanes: int  # over all ranks
    first_epoch: int  # of the stage's own stream (lrexp.data_modules.lanes.TrainStream)


def stages(cfg: "RunConfig") -> List[Stage]:
    """The stages of cfg's curriculum in step order; [] without one. A stage [start_step, W] has the model's
    own blocks per segment R."""
    out = []
    own_blocks = cfg.derived.segment_len // cfg.model.window
    for i, stage in enumerate(cfg.curriculum.stages):
        start, window, blocks = (*stage, own_blocks) if len(stage) == 2 else stage
        n = window * blocks
        out.append(Stage(start, window, n, cfg.data.tokens_per_step // n, i * STAGE_EPOCHS))
    return out


def stage_at(schedule: List[Stage], step: int) -> int:
    """The index of the stage an optimiser step trains in."""
    return bisect.bisect_right([s.start_step for s in schedule], step) - 1
