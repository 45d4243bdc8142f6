"""Lanes and the StreamDataModule: continuity, doc_start, rank partitions, masking, exact cursor resume."""

import itertools
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lrexp.config.load import load
from lrexp.data_modules import StreamDataModule
from lrexp.data_modules.lanes import TrainStream, num_segments, shuffled

N = 64  # the smoke scale's segment length


def write_corpus(folder: Path, n: int = 40) -> Path:
    """Documents from 2 tokens to several segments long (bytes tokenizer: a byte is a token)."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        length = 1 if i == 0 else int(rng.integers(20, 6 * N))  # doc 0: one byte (+ <eos>), one segment
        (folder / f"doc{i:03d}.txt").write_text("".join(rng.choice(list("abcdefgh \n"), size=length)))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("stream") / "corpus")


def cfg_for(corpus: Path, lanes: int = 4, devices: int = 1, *extra: str):
    return load(overrides=[
        "scale=smoke", f"data.corpus={corpus}", f"data.cache_dir={corpus.parent / 'cache'}", "data.tokenizer=bytes",
        "data.val_fraction=0.25", "data.test_fraction=0.2", f"data.tokens_per_step={lanes * N}",
        f"train.devices={devices}", *extra,
    ])


def module(cfg, world_size=1, rank=0) -> StreamDataModule:
    dm = StreamDataModule(cfg, world_size=world_size, rank=rank)
    dm.setup("fit")
    return dm


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def lane_view(batches, row):
    """One lane's stream: (doc_id, tokens, labels, loss_mask, doc_start, doc_pos) per step."""
    return [{k: b[k][row] for k in b if b[k].dim()} for b in batches]


def lane_streams(batches):
    """lane id -> its steps, in order (an evaluation batch holds only the lanes still reading)."""
    streams = {}
    for b in batches:
        for row, lane in enumerate(b["lane"].tolist()):
            streams.setdefault(lane, []).append({k: b[k][row] for k in b if b[k].dim()})
    return streams


def read_documents(batches):
    """Rebuild every document from the lanes' segments (every target in the mask counts), checking that
    each segment continues exactly where the lane's previous one ended."""
    docs = {}
    for steps in lane_streams(batches).values():
        for step in steps:
            doc = int(step["doc_id"])
            if doc < 0:
                assert not step["loss_mask"].any() and not step["doc_start"]  # padding step: fully masked
                continue
            valid = int(step["loss_mask"].sum())
            tokens, labels = step["tokens"].tolist(), step["labels"].tolist()
            assert step["loss_mask"][:valid].all()  # targets are a prefix; the rest is padding
            if step["doc_start"]:
                assert doc not in docs  # each document is read by one lane, once
                docs[doc] = [tokens[0]]
            assert docs[doc][-1] == tokens[0]  # overlaps the previous segment's last target by one token
            assert tokens[1:valid] == labels[: valid - 1]  # labels are the inputs shifted by one
            assert step["doc_pos"][:valid].tolist() == list(range(len(docs[doc]), len(docs[doc]) + valid))
            docs[doc].extend(labels[:valid])
    return docs


def test_validation_pass_reads_every_document_exactly_once_in_order(corpus):
    cfg = cfg_for(corpus, 4)  # the boundary target is masked in training, scored in evaluation
    dm = module(cfg)
    split = dm.prepared.split("validation")
    batches = list(dm.eval_loader("validation", None))
    docs = read_documents(batches)
    assert sorted(docs) == list(range(split.num_docs))
    for i, toks in docs.items():
        assert toks == split.doc(i).tolist()  # the whole document, token for token
    assert sum(int(b["loss_mask"].sum()) for b in batches) == int((split.doc_lengths() - 1).sum())  # every target exactly once
    target_bytes = sum(int(b["target_bytes"].sum()) for b in batches)
    first = dm.prepared.token_bytes[[split.doc(i)[0] for i in range(split.num_docs)]].sum()  # never a target
    assert target_bytes == int(split.doc_bytes.sum() - first)  # bits/byte denominators are exact
    for b in batches:
        assert b["tokens"].dtype == torch.int64 and b["labels"].dtype == torch.int64
        assert (b["target_bytes"][~b["loss_mask"]] == 0).all()
    sizes = [b["tokens"].shape[0] for b in batches]
    assert sizes[0] == 4 and sizes[-1] < 4 and sizes == sorted(sizes, reverse=True)  # shrinks, never pads
    assert all(b["lane"].tolist() == list(range(len(b["lane"]))) for b in batches)  # a prefix of the lanes


def scored_targets(batches):
    """The multiset of (document id, position) targets a pass scores."""
    return sorted((d, p) for b in batches for d, ps, m in zip(b["doc_id"].tolist(), b["doc_pos"].tolist(),
                  b["loss_mask"].tolist()) for p, keep in zip(ps, m) if keep)


@pytest.mark.parametrize("budget", [None, 700])
def test_evaluation_scores_the_same_targets_for_any_segment_length_and_lanes(corpus, budget):
    """docs/models.md#evaluation: a full pass scores every target but each document's first token; a budget pass the
    first `budget` targets of the fixed document order; both whatever N, the lanes and the shuffle seed."""
    setups = [(64, 4, "train.seed=0"), (8, 16, "train.seed=3"), (128, 1, "data.seed=5"), (16, 2, "train.seed=1")]
    seen = []
    for seg, lanes, seed in setups:
        cfg = load(overrides=[
            "scale=smoke", f"data.corpus={corpus}", f"data.cache_dir={corpus.parent / 'cache'}",
            "data.tokenizer=bytes", "data.val_fraction=0.25", "data.test_fraction=0.2", "model.window=8",
            f"model.segment_len={seg}", f"data.tokens_per_step={lanes * seg}", seed,
        ])
        dm = module(cfg)
        seen.append(scored_targets(dm.eval_loader("validation", budget)))
        scored = dm.eval_pass("validation", budget)
        assert scored.targets == len(seen[-1])
    assert all(s == seen[0] for s in seen[1:])
    lengths = dm.prepared.split("validation").doc_lengths()
    if budget is None:
        assert len(seen[0]) == int((lengths - 1).sum())
        assert sorted(set(p for _, p in seen[0]))[0] == 1  # never a document's first token
    else:
        assert len(seen[0]) == budget
        docs = sorted({d for d, _ in seen[0]})
        assert len(docs) < len(lengths)  # a prefix of the fixed order, the last document cut
        assert sum(1 for d in docs if sum(1 for e, _ in seen[0] if e == d) < lengths[d] - 1) <= 1


@pytest.mark.parametrize("stagger", [False, True])
def test_doc_start_exactly_where_a_lane_enters_a_document(corpus, stagger):
    dm = module(cfg_for(corpus, 4, 1, f"data.stagger_lanes={stagger}"))
    steps = dm_epoch_steps(dm)
    stream = TrainStream(num_segments(dm.prepared.split("train").doc_lengths(), N), 4, dm.cfg.derived.data_seed,
                         stagger=stagger)
    batches = take(dm.train_dataloader(), 2 * steps + 3)
    for row in range(4):
        previous = None
        for t, step in enumerate(lane_view(batches, row)):
            entered = stream.epoch_of(t)[1] == 0 or int(step["doc_id"]) != previous  # an epoch starts afresh
            assert bool(step["doc_start"]) == entered
            if not stagger:
                assert bool(step["doc_start"]) == (int(step["doc_pos"][0]) == 1)  # the document's first segment
            previous = int(step["doc_id"])
    # the first step, and the first step of every new epoch, starts a document on every lane
    assert batches[0]["doc_start"].all() and batches[steps]["doc_start"].all()
    first_positions = {int(p) for b in (batches[0], batches[steps]) for p in b["doc_pos"][:, 0]}
    assert (first_positions == {1}) != stagger  # staggered lanes enter past the head of their first document


def dm_epoch_steps(dm) -> int:
    return TrainStream(num_segments(dm.prepared.split("train").doc_lengths(), N), dm.total_lanes,
                       dm.cfg.derived.data_seed, stagger=dm.cfg.data.stagger_lanes).schedule(0).steps


def test_default_masks_the_segment_boundary_target(corpus):
    default = module(cfg_for(corpus, 4))
    crossing = module(cfg_for(corpus, 4, 1, "loss.cross_segment_target=true"))
    a, b = take(default.train_dataloader(), 6), take(crossing.train_dataloader(), 6)
    for x, y in zip(a, b):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["labels"], y["labels"])  # same inputs
        assert not x["loss_mask"][:, N - 1].any()
        assert torch.equal(x["loss_mask"][:, : N - 1], y["loss_mask"][:, : N - 1])
        full = y["doc_pos"][:, N - 1] > 0
        assert torch.equal(y["loss_mask"][:, N - 1], full)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_are_disjoint_cover_all_lanes_and_take_equal_steps(corpus, world_size):
    cfg = cfg_for(corpus, 4, world_size)
    reference = module(cfg_for(corpus, 4, 1))  # one process reading all 4 lanes
    ref_train = take(reference.train_dataloader(), 12)
    ref_val = list(reference.val_dataloader())
    lanes, val_docs = [], []
    for rank in range(world_size):
        dm = module(cfg, world_size, rank)
        assert dm.total_lanes == 4 and dm.lanes_per_rank == 4 // world_size
        rows = slice(rank * dm.lanes_per_rank, (rank + 1) * dm.lanes_per_rank)
        train = take(dm.train_dataloader(), 12)
        val = list(dm.val_dataloader())
        for mine, ref in zip(train, ref_train):
            for key in mine:
                want = ref[key] if key == "step_targets" else ref[key][rows]  # a step's: the same on every rank
                assert torch.equal(mine[key], want), key  # rank r = rows of the global batch
        ref_lanes = lane_streams(ref_val)
        for lane, steps in lane_streams(val).items():  # evaluation: lane i on rank i mod world
            assert lane % world_size == rank
            assert all(torch.equal(a[k], b[k]) for a, b in zip(steps, ref_lanes[lane]) for k in a)
            assert len(steps) == len(ref_lanes[lane])
        lanes.extend(train[0]["lane"].tolist())
        val_docs.extend(d for b in val for d in b["doc_id"].tolist() if d >= 0)
    assert sorted(lanes) == [0, 1, 2, 3]  # disjoint and covering
    n_val = reference.prepared.split("validation").num_docs
    assert sorted(val_docs) == sorted(d for b in ref_val for d in b["doc_id"].tolist() if d >= 0)
    assert sorted(set(val_docs)) == list(range(n_val))


def test_train_stream_crosses_epochs_deterministically(corpus):
    dm = module(cfg_for(corpus, 4))
    steps = dm_epoch_steps(dm)
    stream = TrainStream(num_segments(dm.prepared.split("train").doc_lengths(), N), 4, 0, stagger=True)
    assert stream.epoch_of(steps - 1) == (0, steps - 1) and stream.epoch_of(steps) == (1, 0)
    first = take(dm.train_dataloader(), 3 * steps)
    second = take(module(cfg_for(corpus, 4)).train_dataloader(), 3 * steps)
    for x, y in zip(first, second):
        assert all(torch.equal(x[k], y[k]) for k in x)
    epoch0 = {d for b in first[:steps] for d in b["doc_id"].tolist()}
    epoch1 = [b["doc_id"].tolist() for b in first[steps: 2 * steps]]
    assert epoch1 != [b["doc_id"].tolist() for b in first[:steps]]  # a new shuffle
    assert len(epoch0) >= 4


def test_cursor_restore_yields_the_next_batch(corpus):
    cfg = cfg_for(corpus, 4)
    dm = module(cfg)
    full = take(dm.train_dataloader(), 2 * dm_epoch_steps(dm) + 5)
    for k in (1, 7, dm_epoch_steps(dm) + 2):
        src = module(cfg)
        take(src.train_dataloader(), k)
        state = src.state_dict()
        assert state["train_batches"] == k
        resumed = module(cfg)
        resumed.load_state_dict(state)
        nxt = take(resumed.train_dataloader(), 2)
        for got, want in zip(nxt, full[k: k + 2]):
            assert all(torch.equal(got[key], want[key]) for key in want)


def test_workers_give_the_same_batches(corpus):
    cfg = cfg_for(corpus, 4)
    plain = take(module(cfg).train_dataloader(), 5)
    workers = take(module(cfg_for(corpus, 4, 1, "data.num_workers=2")).train_dataloader(), 5)
    for x, y in zip(plain, workers):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_probe_batches_flag_the_answer_labels(tmp_path):
    cfg = load(overrides=[
        "scale=smoke", "data.corpus=copy", f"data.cache_dir={tmp_path}", "data.tokenizer=bytes",
        "data.probe.num_docs=64", "data.probe.distance=2",
    ])
    dm = module(cfg)
    batches = list(dm.val_dataloader())
    split = dm.prepared.split("validation")
    flagged = sum(int(b["answer_mask"].sum()) for b in batches)
    assert flagged == int(np.asarray(split.answer).sum()) > 0  # every answer token is a target, once
    for b in batches:
        assert not (b["answer_mask"] & ~b["loss_mask"]).any()
        for row in range(b["labels"].shape[0]):
            copied = b["labels"][row][b["answer_mask"][row]]
            assert all(ord("a") <= t <= ord("z") or t == ord(" ") for t in copied.tolist())


class Recorder(pl.LightningModule):
    """A one-parameter module that records the batches it trains on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((int(self.global_step), batch["doc_id"].tolist(), batch["tokens"][:, :4].tolist()))
        return (self.w - batch["tokens"].float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(cfg, max_steps, root, ckpt=None):
    model = Recorder()
    dm = StreamDataModule(cfg)
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=3)],
        default_root_dir=root,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    assert (dm.world_size, dm.rank) == (1, 0)  # read from the trainer
    return model.seen, dm


def test_trainer_resume_continues_with_the_exact_next_batch(corpus, tmp_path):
    cfg = cfg_for(corpus, 4)
    steps = dm_epoch_steps(module(cfg))
    uninterrupted, _ = fit(cfg, steps + 4, tmp_path / "a")
    first, _ = fit(cfg, 3, tmp_path / "b")
    resumed, dm = fit(cfg, steps + 4, tmp_path / "c", ckpt=str(tmp_path / "b" / "last.ckpt"))
    assert first + resumed == uninterrupted
    assert dm.state_dict()["train_batches"] == steps + 4


def test_train_seed_shuffles_the_stream_unless_data_seed_pins_it(corpus):
    """A grid's seed axis varies the data order with the initialisation; data.seed fixes it for all seeds."""
    def first_docs(*extra):
        return [b["doc_id"].tolist() for b in take(module(cfg_for(corpus, 4, 1, *extra)).train_dataloader(), 4)]

    assert first_docs("train.seed=0") != first_docs("train.seed=1")
    assert first_docs("train.seed=0", "data.seed=7") == first_docs("train.seed=1", "data.seed=7")
    assert first_docs("train.seed=7") == first_docs("train.seed=0", "data.seed=7")


def test_lane_groups_split_each_step_and_step_targets_count_every_lane(corpus):
    """train.lane_groups=2: micro-batches (step 0, lanes 0-1), (step 0, lanes 2-3), (step 1, lanes 0-1), ...,
    the same segments as the ungrouped stream; step_targets is the step's targets over all lanes."""
    whole = take(module(cfg_for(corpus, 4)).train_dataloader(), 6)
    groups = take(module(cfg_for(corpus, 4, 1, "train.lane_groups=2")).train_dataloader(), 12)
    for t, step in enumerate(whole):
        first, second = groups[2 * t], groups[2 * t + 1]
        assert first["lane"].tolist() == [0, 1] and second["lane"].tolist() == [2, 3]
        for key in ("tokens", "labels", "loss_mask", "doc_start", "doc_id"):
            assert torch.equal(torch.cat([first[key], second[key]]), step[key]), key
        assert int(step["step_targets"]) == int(step["loss_mask"].sum())
        assert int(first["step_targets"]) == int(second["step_targets"]) == int(step["step_targets"])


def test_staggering_leaves_evaluation_unchanged(corpus):
    plain, staggered = module(cfg_for(corpus, 4, 1, "data.stagger_lanes=false")), module(cfg_for(corpus, 4))
    for split, budget in (("validation", 300), ("validation", None), ("test", None)):
        a, b = list(plain.eval_loader(split, budget)), list(staggered.eval_loader(split, budget))
        assert len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_staggered_lanes_spread_document_boundaries_over_steps():
    segments, lanes = np.full(64, 10, dtype=np.int64), 8  # equal-length documents: lockstep unstaggered
    for stagger in (False, True):
        stream = TrainStream(segments, lanes, seed=3, stagger=stagger)
        entries = [t for t in range(1, 3 * stream.schedule(0).steps) for lane in range(lanes)
                   if stream.entering(lane, t) and stream.epoch_of(t)[1]]  # not an epoch's first step
        phases = {t % 10 for t in entries}
        assert (phases == {0}) != stagger and (len(phases) >= 5 or not stagger)
        read = {stream.schedule(0).locate(lane, 0)[0] for lane in range(lanes)}
        assert read == set(shuffled(64, 3, 0)[:lanes].tolist())  # the same shuffle, whatever the staggering
