"""Checkpoint location, reading (weights_only) and the model-config mismatch error."""

import pytest
import torch

from lrexp.config.load import load, to_dict
from lrexp.lit import checkpoint as ckpt_mod
from lrexp.lit.module import CHECKPOINT_META_KEY


def write(path, cfg, vocab=512, run_id="abc", **extra):
    meta = {"config": to_dict(cfg), "vocab_size": vocab, "run_id": run_id}
    torch.save({CHECKPOINT_META_KEY: meta, "state_dict": {"w": torch.zeros(2)}, **extra}, path)
    return path


def test_locate_by_file_by_folder_and_by_run_id(tmp_path):
    cfg = load(overrides=["scale=smoke"])
    (tmp_path / "run1").mkdir()
    path = write(tmp_path / "run1" / "last.ckpt", cfg)
    assert ckpt_mod.locate(str(path), tmp_path) == path
    assert ckpt_mod.locate(str(tmp_path / "run1"), tmp_path) == path
    assert ckpt_mod.locate("run1", tmp_path) == path
    with pytest.raises(ckpt_mod.CheckpointError, match="no such checkpoint.*nope"):
        ckpt_mod.locate("nope", tmp_path)


def test_another_model_config_is_refused_naming_the_keys(tmp_path):
    cfg = load(overrides=["scale=smoke"])
    info = ckpt_mod.read(write(tmp_path / "a.ckpt", cfg))
    ckpt_mod.check_compatible(cfg, info, 512)
    # not model keys: a resumed run may change them
    ckpt_mod.check_compatible(load(overrides=["scale=smoke", "train.max_steps=99"]), info)
    other = load(overrides=["scale=smoke", "model.d_model=64", "model.recurrent.gate=lstm"])
    with pytest.raises(ckpt_mod.CheckpointError) as err:
        ckpt_mod.check_compatible(other, info)
    msg = str(err.value)
    assert "model.d_model=32 there, 64 here" in msg and "model.recurrent.gate='fixed' there" in msg
    assert "\n" not in msg
    with pytest.raises(ckpt_mod.CheckpointError, match="vocabulary size=512 there, 300 here"):
        ckpt_mod.check_compatible(cfg, info, 300)


class NotAWeight:
    pass


def test_read_is_weights_only_and_names_the_file(tmp_path):
    cfg = load(overrides=["scale=smoke"])
    evil = write(tmp_path / "evil.ckpt", cfg, payload=NotAWeight())
    with pytest.raises(ckpt_mod.CheckpointError, match="cannot read checkpoint .*evil.ckpt"):
        ckpt_mod.read(evil)
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ckpt_mod.CheckpointError, match="not an lrexp training checkpoint"):
        ckpt_mod.read(tmp_path / "plain.ckpt")
    (tmp_path / "junk.ckpt").write_text("junk")
    with pytest.raises(ckpt_mod.CheckpointError, match="junk.ckpt"):
        ckpt_mod.read(tmp_path / "junk.ckpt")
