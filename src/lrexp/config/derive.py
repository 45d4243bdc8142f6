"""Values computed from the inputs, never written by users: the `derived` section of a RunConfig.

Pure functions of a config that checks.py has already validated (lrexp.config.checks.resolve calls them in
that order), so none of them raises; the checks call the same functions, so a rule and the value it guards
are computed one way.
"""

from __future__ import annotations

from typing import Collection, Dict, List

from lrexp.config.schema import DerivedConfig, ModelConfig, RunConfig, SlotsConfig


def segment_len(m: ModelConfig) -> int:
    """N: `model.segment_len` if given, else blocks_per_segment x window."""
    return m.segment_len if m.segment_len is not None else m.blocks_per_segment * m.window


def absolute_layers(indices: List[int], num_layers: int) -> List[int]:
    """Stack indices (negative: from the top) as absolute ones: -3 is layer L-3 at every depth."""
    return [idx + num_layers if idx < 0 else idx for idx in indices]


def slot_layers(slots: SlotsConfig, num_layers: int) -> List[int]:
    """`model.slots.layers` as absolute indices ("all": every layer); none while slots are off."""
    if not slots.enabled:
        return []
    if slots.layers == "all":
        return list(range(num_layers))
    return absolute_layers(slots.layers, num_layers)


def position_buckets(cfg: RunConfig) -> List[int]:
    """Bucket edges of the loss by position: a function of the scale alone, never of a row's N or W, so
    every row of a grid logs the same buckets (docs/models.md#metrics)."""
    edges = cfg.log.position_buckets
    if edges is None:
        return [8 * cfg.scale.window * 4**i for i in range(3)]  # 4096, 16384, 65536 at the paper's W = 512
    return list(edges)


# Cadences a short run scales down when the user did not set them (docs/configuration.md#short-runs): key ->
# (the most the run may be below it, in multiples of max_steps; how many times per run it becomes)
SHORT_RUN_CADENCES = {"train.val_every": (1, 4), "log.every_n_steps": (2, 10)}


def short_run_cadences(max_steps: int, values: Dict[str, int], user: Collection[str]) -> Dict[str, List[int]]:
    """The cadences a run of `max_steps` would not see (validation: not once; logging: not twice) that the
    user did not set (`user`: the keys of their files and overrides), scaled to a few times per run:
    key -> [the presets' value, the run's]. Validation then comes 4 times, training metrics 10 times."""
    out = {}
    for key, (times, per_run) in SHORT_RUN_CADENCES.items():
        value = values[key]
        if key not in user and times * value > max_steps:
            out[key] = [value, max(1, max_steps // per_run)]
    return out


def derive(cfg: RunConfig, segment_invariant: bool) -> DerivedConfig:
    """The `derived` section. segment_invariant: the row's variant computes the same whatever its segment
    length (the variant registry says so), so evaluation may read longer segments."""
    m = cfg.model
    n = segment_len(m)
    tps = cfg.data.tokens_per_step
    lanes = tps // n
    world, groups = cfg.train.devices * cfg.train.num_nodes, cfg.train.lane_groups
    # A segment-invariant row reads segments of 8 x the scale's window (the paper's N) in evaluation whatever
    # its own N, at the same tokens per step; the others their own N.
    eval_len = n * max(1, 8 * cfg.scale.window // n) if segment_invariant else n
    return DerivedConfig(
        segment_len=n,
        head_dim=m.d_model // m.num_heads,
        lanes=lanes,
        lanes_per_rank=lanes // world,
        lanes_per_group=lanes // (world * groups),
        eval_segment_len=eval_len,
        eval_lanes_per_rank=max(1, tps // eval_len // world),
        recurrent_layers=sorted(absolute_layers(m.recurrent.layers, m.num_layers)),
        knn_layers=sorted(absolute_layers(m.knn.layers, m.num_layers)),
        slot_layers=sorted(slot_layers(m.slots, m.num_layers)),
        data_seed=cfg.train.seed if cfg.data.seed is None else cfg.data.seed,
        position_buckets=position_buckets(cfg),
        adapted=dict(cfg.derived.adapted),  # set by the loader, which alone knows what the user set
    )
