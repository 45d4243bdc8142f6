"""LMModule + TBPTTCallback + PerfCallback inside a real Trainer, around a toy model and a toy stream.

The toy honours the model interface (initial_state, forward(tokens, state, measure), ModelState's
reset_rows / detach / to_tensors / stats) with a one-vector state per lane, so the state's lifecycle is visible exactly.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lrexp.config.load import load
from lrexp.lit.module import LMModule, TrainingDiverged
from lrexp.lit.perf import PerfCallback
from lrexp.lit.tbptt import TBPTTCallback

V, B, N, D = 16, 2, 8, 8


class ToyState:
    def __init__(self, h: torch.Tensor) -> None:
        self.h = h  # [B, D]
        self.stats = {}  # the toy measures nothing

    def reset_rows(self, doc_start: torch.Tensor) -> "ToyState":
        return ToyState(torch.where(doc_start[:, None], torch.zeros_like(self.h), self.h))

    def detach(self) -> "ToyState":
        return ToyState(self.h.detach())

    @property
    def batch_size(self) -> int:
        return self.h.shape[0]

    def lanes(self, index: slice) -> "ToyState":
        return ToyState(self.h[index])

    @classmethod
    def cat(cls, parts) -> "ToyState":
        return ToyState(torch.cat([p.h for p in parts]))

    def to_tensors(self) -> dict:
        return {"h": self.h}


class ToyLM(nn.Module):
    backend = "reference"

    def __init__(self, nan_at_call: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.out = nn.Linear(D, V)
        self.calls = 0
        self.nan_at_call = nan_at_call

    def initial_state(self, batch_size: int, device) -> ToyState:
        return ToyState(torch.zeros(batch_size, D, device=device))

    def forward(self, tokens, state, measure=False):
        self.calls += self.training  # training calls only: the sanity check runs first
        x = self.embed(tokens) + state.h[:, None, :]  # [B, N, D]
        logits = self.out(x)  # [B, N, V]
        if self.calls == self.nan_at_call:
            logits = logits * float("nan")
        return logits, ToyState(torch.tanh(self.mix(x.mean(1))))  # [B, D]


def toy_batches(steps: int, seed: int, first_doc_start: bool = True) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        tokens = torch.randint(0, V, (B, N), generator=g)
        doc_start = torch.tensor([t % 3 == 0, t % 2 == 0]) & torch.tensor(t > 0 or first_doc_start)
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[1, N - 3:] = t % 4 == 3  # ragged padding on some steps
        out.append({
            "tokens": tokens,
            "labels": torch.roll(tokens, -1, 1),
            "loss_mask": mask,
            "doc_start": doc_start,
            "target_bytes": torch.full((B, N), 2) * mask,
            "doc_pos": torch.arange(N).repeat(B, 1) + t * N,
            "lane": torch.arange(B),
            "doc_id": torch.arange(B),
            "step_targets": mask.sum(),
        })
    return out


class ToyData(pl.LightningDataModule):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.train = toy_batches(steps, seed=1)
        # the first validation batch starts no document: its state must still be fresh, not the train state
        self.val = toy_batches(3, seed=2, first_doc_start=False)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=None)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=None)


class Probe(pl.Callback):
    """Records the state each batch starts from (after TBPTT's reset) and ends with (after its detach)."""

    def __init__(self, tbptt: TBPTTCallback) -> None:
        self.tbptt = tbptt
        self.train_start, self.train_end, self.losses = [], [], []
        self.val_start = []
        self.train_around_val = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train_start.append(self.tbptt.state("train").h.clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_end.append(self.tbptt.state("train").h)
        self.losses.append(float(outputs["loss"]))

    def on_validation_epoch_start(self, trainer, pl_module):
        self.train_around_val.append(self._train_h())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.val_start.append(self.tbptt.state("val").h.clone())

    def on_validation_epoch_end(self, trainer, pl_module):
        self.train_around_val.append(self._train_h())

    def _train_h(self):
        state = self.tbptt._groups[0]
        return None if state is None else state.h.clone()


def fit(steps=6, val_every=100, accumulate=1, model=None, extra=(), overrides=()):
    cfg = load(overrides=["scale=smoke", f"train.lane_groups={accumulate}", *overrides])
    tbptt = TBPTTCallback(accumulate)
    probe = Probe(tbptt)
    module = LMModule(cfg, model or ToyLM(), tbptt, V)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulate,
        val_check_interval=val_every * accumulate, check_val_every_n_epoch=None, limit_val_batches=3,
        num_sanity_val_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[tbptt, probe, *extra],
    )
    trainer.fit(module, datamodule=ToyData(steps * accumulate))
    return trainer, module, probe


def test_lanes_reset_at_doc_start_and_carry_otherwise():
    trainer, _, probe = fit(steps=6)
    batches = toy_batches(6, seed=1)
    assert len(probe.train_start) == 6
    for t in range(1, 6):
        for lane in range(B):
            expected = torch.zeros(D) if batches[t]["doc_start"][lane] else probe.train_end[t - 1][lane]
            assert torch.equal(probe.train_start[t][lane], expected), (t, lane)
    assert all(e.abs().sum() > 0 for e in probe.train_end)  # the carried values are not trivially zero
    assert all(not e.requires_grad for e in probe.train_end)  # detached after every step


def test_mid_epoch_validation_leaves_train_state_bit_identical():
    _, _, with_val = fit(steps=6, val_every=2)
    _, _, without = fit(steps=6, val_every=100)
    # validation ran twice mid-epoch (after steps 2 and 4) plus the sanity check
    assert len(with_val.val_start) == 4 and len(without.val_start) == 1
    before, after = with_val.train_around_val[0::2], with_val.train_around_val[1::2]
    assert all((b is None) == (a is None) and (b is None or torch.equal(b, a)) for b, a in zip(before, after))
    # every validation starts from a fresh state, even though its first batch starts no document
    assert all(torch.equal(v, torch.zeros(B, D)) for v in with_val.val_start)
    assert with_val.losses == without.losses
    assert torch.equal(with_val.train_end[-1], without.train_end[-1])


class GradProbe(pl.Callback):
    """Over lane groups: the state a micro-batch starts from has no graph; the one it produced had."""

    def __init__(self) -> None:
        self.start_has_graph, self.produced_graph = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start_has_graph.append(pl_module.tbptt.state("train").h.requires_grad)

    def on_before_backward(self, trainer, pl_module, loss):
        self.produced_graph.append(pl_module.tbptt.state("train").h.requires_grad)


def test_two_lane_groups_detach_between_micro_batches():
    grad = GradProbe()
    trainer, _, probe = fit(steps=3, accumulate=2, extra=[grad])
    assert trainer.global_step == 3 and len(probe.train_start) == 6
    assert grad.produced_graph == [True] * 6  # the state carries a graph until the batch ends...
    assert grad.start_has_graph == [False] * 6  # ...and never into the next micro-batch


def test_non_finite_loss_stops_with_a_clear_reason():
    with pytest.raises(TrainingDiverged, match=r"training loss is nan at step 2"):
        fit(steps=6, model=ToyLM(nan_at_call=3))


def test_module_without_its_callback_in_the_trainer_fails_early():
    cfg = load(overrides=["scale=smoke"])
    module = LMModule(cfg, ToyLM(), TBPTTCallback(), V)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="TBPTTCallback"):
        trainer.fit(module, datamodule=ToyData(1))


def test_perf_metrics_after_warmup():
    perf = PerfCallback(tokens_per_step=B * N, warmup_steps=2)
    trainer, _, _ = fit(steps=6, extra=[perf])
    assert len(perf.durations) == 4
    m = trainer.callback_metrics
    step_time = float(m["perf/step_time_s"])
    assert step_time > 0
    assert float(m["perf/tokens_per_s"]) == pytest.approx(B * N / step_time, rel=1e-5)
    assert float(m["perf/peak_mem_mb"]) > 1


def _fake_trainer(world_size: int, rank: int = 0):
    from types import SimpleNamespace

    return SimpleNamespace(world_size=world_size, global_rank=rank, strategy=SimpleNamespace(all_gather=lambda t: t))


def test_checkpointed_state_restores_on_the_same_layout_and_resets_with_a_warning_otherwise():
    cfg = load(overrides=["scale=smoke"])
    module = LMModule(cfg, ToyLM(), TBPTTCallback(), V)
    saving = TBPTTCallback()
    saving.update("train", ToyState(torch.arange(B * D, dtype=torch.float32).view(B, D)))
    checkpoint = {}
    saving.on_save_checkpoint(_fake_trainer(1), module, checkpoint)
    saved = checkpoint["lrexp_carried_state"]
    assert saved["world_size"] == 1 and saved["tensors"]["h"].shape == (1, B, D)  # [world, B, D]

    same = TBPTTCallback()
    same.on_load_checkpoint(_fake_trainer(1), module, checkpoint)
    assert torch.equal(same._restored["h"], saved["tensors"]["h"][0])

    other = TBPTTCallback()
    with pytest.warns(UserWarning, match="from 1 rank.*this run has 2.*fresh state"):
        other.on_load_checkpoint(_fake_trainer(2), module, checkpoint)
    assert other._restored is None
