"""`lrexp data prepare --path DIR --name NAME` records a corpus's settings once; `data=NAME` then selects
them in every command, `data prepare` included (docs/data.md#data-presets)."""

from __future__ import annotations

import pytest

from corpora import word_documents
from lrexp import cli
from lrexp.config import load as load_mod
from lrexp.config.errors import ConfigError
from lrexp.config.load import load


@pytest.fixture
def presets(tmp_path, monkeypatch):
    """The presets' folder in tmp, a small corpus and a data cache beside it."""
    monkeypatch.setitem(load_mod.PRESET_DIRS, "data", tmp_path / "presets")
    corpus = word_documents(tmp_path / "my corpus", "a user's own corpus of plain text files",
                            [30 + 7 * i for i in range(20)])
    return tmp_path, corpus


def test_prepare_records_a_preset_that_data_name_selects(presets, capsys, monkeypatch):
    root, corpus = presets
    monkeypatch.chdir(root)  # a relative --path is recorded absolute: the preset works from anywhere
    cache = f"data.cache_dir={root / 'cache'}"
    argv = ["data", "prepare", "--path", "my corpus", "--name", "mine", "data.tokenizer=bytes", "data.val_fraction=0.25", "data.test_fraction=0.25",
            "scale=smoke", cache]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"data preset 'mine': {root / 'presets' / 'mine.yaml'} (select it with data=mine)" in out
    cfg = load(overrides=["data=mine", "scale=tiny"])
    assert (cfg.data.corpus, cfg.data.tokenizer, cfg.data.val_fraction) == (str(corpus), "bytes", 0.25)
    assert load(overrides=["data=mine", "data.val_fraction=0.1"]).data.val_fraction == 0.1  # overrides still win
    # data prepare takes the selector too: the same tokens, already prepared
    assert cli.main(["data", "prepare", "data=mine", "scale=smoke", cache]) == 0
    assert str(root / "cache") in capsys.readouterr().out
    # recording the same settings again is fine; other settings under the name are refused before any work
    assert cli.main(argv) == 0
    assert cli.main([*argv, "data.test_fraction=0.3"]) == 2
    assert "data preset 'mine' exists with other settings" in capsys.readouterr().err


def test_unknown_presets_and_bad_ones_are_one_line(presets):
    root, _ = presets
    with pytest.raises(ConfigError, match=r"unknown data 'nope'; available: none yet \(record one: lrexp data "
                                          r"prepare --path DIR --name NAME\)"):
        load(overrides=["data=nope"])
    (root / "presets").mkdir()
    (root / "presets" / "odd.yaml").write_text("data:\n  corpus: stdlib\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="a data preset holds the 'data' section only, not train"):
        load(overrides=["data=odd"])
    assert cli.main(["data", "prepare", "--name", "no/slash"]) == 2
