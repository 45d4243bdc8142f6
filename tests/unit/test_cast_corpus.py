"""The generated `cast` corpus and the loss on names by distance to their previous mention
(docs/data.md#the-cast-corpus)."""

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lrexp.config.errors import ConfigError
from lrexp.config.load import load
from lrexp.data_modules.cast import story
from lrexp.data_modules.datamodule import StreamDataModule
from lrexp.data_modules.store import check_config
from lrexp.lit.metrics import TokenStats, mention_buckets
from lrexp.report import plots


def test_mentions_mark_every_name_and_the_distance_back_to_its_previous_mention():
    text, mentions = story(random.Random("t"), cast_size=12, length=6000)
    assert story(random.Random("t"), 12, 6000) == (text, mentions)  # deterministic from the seed
    last = {}
    for start, end, distance in mentions:
        name = text[start:end]
        assert name[0].isupper() and name[1:].islower() and not text[end].isalpha() and not text[start - 1].isalpha()
        assert distance == (start - last[name] if name in last else 0)
        last[name] = start
    distances = np.array([d for _, _, d in mentions])
    assert len(last) == 12 and (distances == 0).sum() == 12  # each name introduced once
    assert distances.max() > 2000 and np.median(distances[distances > 0]) < 500  # near and far re-mentions
    assert text.count(" called ") == 12  # a first mention introduces the name


def test_short_sentences_put_names_closer_and_denser_than_prose():
    short, short_marks = story(random.Random("t"), cast_size=12, length=6000, sentences="short")
    prose, prose_marks = story(random.Random("t"), cast_size=12, length=6000)
    assert story(random.Random("t"), 12, 6000, "short") == (short, short_marks)  # deterministic from the seed

    def density_and_median(text, mentions):
        spans = sum(end - start for start, end, _ in mentions)
        return spans / len(text), np.median([d for _, _, d in mentions if d > 0])

    (dense, near), (sparse, far) = density_and_median(short, short_marks), density_and_median(prose, prose_marks)
    assert dense > 0.4 > 0.3 > sparse and near < far / 2
    assert short.count(" was a ") == 12 and all(short[end] in " .\n" for _, end, _ in short_marks)


def test_cast_sentences_must_name_a_template_set():
    with pytest.raises(ConfigError, match="data.cast.sentences"):
        check_config(load(overrides=["scale=smoke", "data.corpus=cast", "data.tokenizer=bytes",
                                     "data.cast.sentences=poems"]))


@pytest.fixture(scope="module")
def cast_module(tmp_path_factory):
    cfg = load(overrides=[
        "scale=smoke", "data.corpus=cast", f"data.cache_dir={tmp_path_factory.mktemp('cast')}",
        "data.tokenizer=bytes", "data.cast.num_docs=24", "data.cast.doc_bytes=1500", "data.val_fraction=0.25",
        "data.prepare_workers=1",
    ])
    dm = StreamDataModule(cfg)
    dm.setup("fit")
    return dm


def test_batches_carry_the_mention_distance_of_each_label(cast_module):
    split = cast_module.prepared.split("validation")
    marks = np.asarray(split.mention)
    names = 0
    for b in cast_module.val_dataloader():
        dist, labels = b["mention_dist"], b["labels"]
        assert not (dist.ne(0) & ~b["loss_mask"]).any()
        for row, col in dist.ne(0).nonzero().tolist():
            d = int(dist[row, col])
            assert chr(int(labels[row, col])).isalpha()
            if d > 0:  # the same token d targets back, within the same lane's document
                pos = int(b["doc_pos"][row, col])
                doc = split.doc(int(b["doc_id"][row]))
                assert doc[pos] == labels[row, col] and doc[pos - d] == doc[pos]
            names += 1
    assert names == int((marks != 0).sum()) > 0  # every name token is a target, once


def test_cast_needs_the_bytes_tokenizer():
    with pytest.raises(ConfigError, match="data.tokenizer=bytes"):
        check_config(load(overrides=["scale=smoke", "data.corpus=cast"]))


def test_mention_loss_by_distance_against_a_hand_count():
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    mention = torch.tensor([[0, -1, 5, 40], [300, 5, 0, 0]])  # first mention, then distances 5, 40, 300, 5
    stats = TokenStats([64], mention_buckets(4))  # edges 4, 16, 64, 256, 1024
    stats.update(nll, mask, torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), None, mention)
    out = {k: float(v) for k, v in stats.compute().items()}
    bits = {k[len("mention_bits_per_token/"):]: v for k, v in out.items() if k.startswith("mention_bits")}
    assert bits == pytest.approx({"first": 2 / math.log(2), "4-16": (3 + 6) / 2 / math.log(2),
                                  "16-64": 4 / math.log(2), "256-1024": 5 / math.log(2)})
    assert out["mention_targets/4-16"] == 2


def test_report_draws_the_loss_by_mention_distance_first_mentions_leftmost(tmp_path):
    prefix = "final/val_mention_bits_per_token_"
    cells = [SimpleNamespace(metrics={prefix + "64-256": 2.0 + s, prefix + "first": 3.0, prefix + "1024": 2.5})
             for s in (0.0, 0.1)]
    rows = [SimpleNamespace(group="row=slide13", finished=cells), SimpleNamespace(group="row=x", finished=[])]
    assert sorted(["1024", "first", "64-256"], key=plots._bucket_low) == ["first", "64-256", "1024"]
    assert plots.plot_loss_by_mention_distance(rows, tmp_path / "m.png") and (tmp_path / "m.png").stat().st_size
    assert not plots.plot_loss_by_mention_distance(rows[1:], tmp_path / "none.png")  # not a mention corpus
