"""Progress without a terminal: no bar, a line every `log.progress_every_s` seconds and one per evaluation
(docs/configuration.md#logs). The callback is driven by hand with a stand-in trainer and a stepped clock."""

from __future__ import annotations

import io
from types import SimpleNamespace

import torch
from lightning.pytorch.trainer.states import TrainerFn

from lrexp.lit import progress
from lrexp.lit.progress import ProgressLines, use_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_is_for_terminals_only():
    assert use_bar(True, Terminal()) and not use_bar(False, Terminal())
    assert not use_bar(True, io.StringIO())  # a file or pipe: SLURM, nohup, a grid cell's log


def test_lines_come_every_n_seconds_and_at_each_evaluations_end(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    lines = ProgressLines(every_s=10.0, tokens_per_step=100, out=out)
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, max_steps=1000, sanity_checking=False,
                              callback_metrics={}, num_val_batches=[40], num_test_batches=[30],
                              state=SimpleNamespace(fn=TrainerFn.FITTING))
    lines.on_train_start(trainer, None)
    for step in range(1, 101):  # a step every second: 100 s of training
        clock[0] += 1.0
        trainer.global_step = step
        trainer.callback_metrics = {"train/loss": torch.tensor(2.5)}
        lines.on_train_batch_end(trainer, None, None, None, step - 1)
    trainer.sanity_checking = True  # the sanity check says nothing
    lines.on_validation_start(trainer, None)
    lines.on_validation_end(trainer, None)
    trainer.sanity_checking = False
    lines.on_validation_start(trainer, None)
    for batch in range(40):
        clock[0] += 0.5
        lines.on_validation_batch_end(trainer, None, None, None, batch)
    trainer.callback_metrics = {"val/bits_per_token": torch.tensor(3.25)}
    lines.on_validation_end(trainer, None)
    trainer.state.fn = TrainerFn.TESTING
    lines.on_test_start(trainer, None)
    trainer.callback_metrics = {"final/test_bits_per_token": torch.tensor(3.5)}
    lines.on_test_end(trainer, None)

    text = out.getvalue().splitlines()
    train = [ln for ln in text if ln.startswith("train:")]
    assert len(train) == 10  # 100 s at one line per 10 s, not 100 lines
    assert train[0] == "train: step 10/1000, elapsed 10s, train/loss 2.5000, 100 tokens/s, left 16m30s"
    assert [ln for ln in text if ln.startswith("validation:")] == ["validation: batch 20/40, elapsed 10s",
                                                                   "validation: batch 40/40, elapsed 20s"]
    assert text[-2] == "validation at step 100 done in 20s: val/bits_per_token 3.2500"
    assert text[-1] == "final test pass done in 0s: final/test_bits_per_token 3.5000"
    assert len(text) == 14


def test_other_ranks_print_nothing():
    out = io.StringIO()
    lines = ProgressLines(every_s=0.0, tokens_per_step=1, out=out)
    trainer = SimpleNamespace(is_global_zero=False, global_step=1, max_steps=2, callback_metrics={})
    lines.on_train_start(trainer, None)
    lines.on_train_batch_end(trainer, None, None, None, 0)
    assert out.getvalue() == ""
