"""How `lrexp eval` lays out its passes (lrexp.eval.passes): packed segments, lane occupancy, steps per policy."""

from dataclasses import replace

import pytest
import torch

from lrexp.cache import build_policy
from lrexp.config.errors import ConfigError
from lrexp.config.load import load
from lrexp.eval.passes import _Lanes, _passes, block_of, packed, settings


def _batch(lanes, first):
    return {"tokens": torch.arange(first, first + lanes)[:, None].expand(lanes, 4), "step_targets": torch.tensor(lanes)}


def test_packed_puts_whole_batches_side_by_side_in_order():
    batches = [_batch(2, 0), _batch(2, 2), _batch(1, 4), _batch(2, 5)]
    out = list(packed(batches, 4))
    assert [b["tokens"][:, 0].tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6]]
    assert [int(b["step_targets"]) for b in out] == [4, 3]
    assert [b["tokens"].shape[0] for b in packed(batches, 1)] == [2, 2, 1, 2]  # a batch is never split


def test_lane_occupancy_counts_the_steps_under_half_the_lanes():
    lanes = _Lanes()
    for n in (4, 4, 3, 1):
        lanes.update(_batch(n, 0))
    assert lanes.occupancy() == (12 / 16, 0.25) and lanes.tokens == 48


def test_auto_mode_takes_blocks_only_where_they_are_exact():
    cfg = load(overrides=["scale=smoke", "row=full"])
    p = {name: build_policy(name, None if name == "full" else 8, cfg.policy)
         for name in ("full", "window", "sinks", "h2o", "tova")}
    auto = replace(cfg, policy=replace(cfg.policy, mode="auto"))
    assert {n: block_of(auto, x, 64) for n, x in p.items()} == {"full": 8, "window": 8, "sinks": 8, "h2o": 1,
                                                               "tova": 1}
    token = replace(cfg, policy=replace(cfg.policy, mode="token"))
    block = replace(cfg, policy=replace(cfg.policy, mode="block", block=4))
    assert {block_of(token, x, 64) for x in p.values()} == {1} and {block_of(block, x, 64) for x in p.values()} == {4}


def test_every_token_mode_setting_runs_in_one_pass():
    cfg = load(overrides=["scale=smoke", "row=full", "policy.names=[window,h2o,sinks,tova]", "policy.budgets=[8,16]"])
    labels = [[p.label() for p in group] for group in _passes(cfg, settings(cfg), 64)]
    assert labels == [["full"], ["window:8", "window:16"], ["h2o:8", "h2o:16", "tova:8", "tova:16"],
                      ["sinks:8", "sinks:16"]]
    token = replace(cfg, policy=replace(cfg.policy, mode="token"))
    assert [[p.label() for p in group] for group in _passes(token, settings(token), 64)] == [
        ["full"], ["window:8", "window:16", "h2o:8", "h2o:16", "sinks:8", "sinks:16", "tova:8", "tova:16"]]


def test_compiling_the_token_step_in_block_mode_is_refused():
    with pytest.raises(ConfigError, match="'policy.compile' compiles the token step"):
        load(overrides=["scale=smoke", "policy.mode=block", "policy.compile=true"])
    assert load(overrides=["scale=smoke", "policy.compile=true"]).policy.compile
