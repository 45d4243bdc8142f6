"""Checkpoint location, reading (weights_only) and the model-config mismatch error."""

import errno
import os

import pytest
import torch

from lrexp.config.load import load, to_dict
from lrexp.lit import checkpoint as ckpt_mod
from lrexp.errors import StorageError
from lrexp.lit.module import CHECKPOINT_META_KEY
from lrexp.lit.saving import AtomicCheckpointIO


def write(path, cfg, vocab=512, run_id="abc", **extra):
    meta = {"config": to_dict(cfg), "vocab_size": vocab, "run_id": run_id}
    torch.save({CHECKPOINT_META_KEY: meta, "state_dict": {"w": torch.zeros(2)}, "global_step": 0, **extra}, path)
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


def test_read_is_weights_only_and_says_what_a_bad_file_is(tmp_path):
    cfg = load(overrides=["scale=smoke"])
    evil = write(tmp_path / "evil.ckpt", cfg, payload=NotAWeight())
    with pytest.raises(ckpt_mod.CheckpointError) as err:
        ckpt_mod.read(evil)
    assert str(err.value) == (f"{evil} is refused: it holds objects other than tensors and plain data, and loading "
                              f"it could run code")  # no advice to load it with weights_only=False
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ckpt_mod.CheckpointError, match="not an lrexp training checkpoint"):
        ckpt_mod.read(tmp_path / "plain.ckpt")
    (tmp_path / "notes.ckpt").write_text("a text file, not a checkpoint\n")
    with pytest.raises(ckpt_mod.CheckpointError, match=r"notes.ckpt is not a PyTorch checkpoint \(a file torch.save"):
        ckpt_mod.read(tmp_path / "notes.ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(evil.read_bytes()[:300])
    with pytest.raises(ckpt_mod.CheckpointError, match="cut.ckpt is cut short: its end is missing"):
        ckpt_mod.read(cut)


def test_a_folder_resumes_from_its_newest_readable_checkpoint_and_says_why(tmp_path):
    cfg = load(overrides=["scale=smoke"])
    run = tmp_path / "run1"
    run.mkdir()
    write(run / "last-1.ckpt", cfg, global_step=4)
    last = write(run / "last.ckpt", cfg, global_step=6)
    said = []
    assert ckpt_mod.locate("run1", tmp_path, say=said.append) == last and said == []
    last.write_bytes(last.read_bytes()[:1000])  # a save cut short
    assert ckpt_mod.locate("run1", tmp_path, say=said.append) == run / "last-1.ckpt"
    assert said == ["resuming from last-1.ckpt (step 4): skipped last.ckpt (is cut short: its end is missing (a "
                    "save that was interrupted or ran out of space))"]
    (run / "last-1.ckpt").write_text("junk")
    with pytest.raises(ckpt_mod.CheckpointError, match=r"no readable checkpoint in .*run1 \(last.ckpt \(is cut short"):
        ckpt_mod.locate("run1", tmp_path)


def test_saves_are_atomic_keep_the_earlier_ones_and_a_failed_save_is_one_line(tmp_path, monkeypatch):
    io = AtomicCheckpointIO(keep=3)
    run = tmp_path / "run1"
    for step in (1, 2, 3, 4):
        io.save_checkpoint({"global_step": step}, run / "last.ckpt")
    assert [ckpt_mod.saved_step(p) for p in ckpt_mod.saved(run)] == [4, 3, 2]
    assert sorted(p.name for p in run.iterdir()) == ["last-1.ckpt", "last-2.ckpt", "last.ckpt"]

    def full(fd):  # the disk fills while the new checkpoint is written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError) as err:
        io.save_checkpoint({"global_step": 5}, run / "last.ckpt")
    assert str(err.value) == (f"cannot write a checkpoint to {run}: No space left on device; free space on its disk "
                              f"or set train.checkpoint_dir to another folder")
    assert [ckpt_mod.saved_step(p) for p in ckpt_mod.saved(run)] == [4, 3, 2]  # all whole, no partial file left
    assert sorted(p.name for p in run.iterdir()) == ["last-1.ckpt", "last-2.ckpt", "last.ckpt"]
