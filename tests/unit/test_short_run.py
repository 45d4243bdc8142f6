"""A run shorter than its cadences says so in one line, and the cadences the user did not set scale down
to it (docs/configuration.md#short-runs)."""

from __future__ import annotations

from lrexp.config.load import load
from lrexp.grid.expand import config_hash
from lrexp.train.validate import short_run_note


def test_unset_cadences_scale_down_and_the_line_says_to_what():
    cfg = load(overrides=["train.max_steps=20"])  # tiny: val_every 100, warm-up 30; log.every_n_steps 50
    assert (cfg.train.val_every, cfg.log.every_n_steps) == (5, 2)  # 4 validations, 10 logged points
    assert cfg.derived.adapted == {"train.val_every": [100, 5], "log.every_n_steps": [50, 2]}
    assert short_run_note(cfg) == (
        "short run, train.max_steps=20: train.val_every 100 -> 5, log.every_n_steps 50 -> 2 (not set, so scaled "
        "to the run; set them to choose); below optim.warmup_steps (30): the learning rate never reaches its peak")


def test_cadences_the_user_set_stay_and_are_named(tmp_path):
    cfg = load(overrides=["train.max_steps=30", "train.val_every=100"])
    assert cfg.train.val_every == 100 and cfg.log.every_n_steps == 3
    note = short_run_note(cfg)
    assert "log.every_n_steps 50 -> 3" in note and "below train.val_every (100): no validation curve" in note
    config = tmp_path / "run.yaml"  # a file the user gives counts as theirs too
    config.write_text("log:\n  every_n_steps: 20\ntrain:\n  max_steps: 30\n")
    cfg = load([config])
    assert cfg.log.every_n_steps == 20 and cfg.train.val_every == 7
    assert "twice log.every_n_steps (20)" in short_run_note(cfg)


def test_a_long_enough_run_is_left_alone_and_silent():
    cfg = load(overrides=["train.max_steps=1000"])
    assert cfg.derived.adapted == {} and short_run_note(cfg) is None
    assert (cfg.train.val_every, cfg.log.every_n_steps) == (100, 50)


def test_a_resumed_grid_cell_trained_longer_keeps_its_identity():
    """Scaled cadences follow max_steps, which a grid may raise to train a finished cell on (--resume)."""
    short, longer = (load(overrides=["scale=smoke", f"train.max_steps={m}"]) for m in (5, 9))
    assert short.train.val_every != longer.train.val_every
    assert config_hash(short, steps=False) == config_hash(longer, steps=False)
    assert config_hash(short) != config_hash(longer)
