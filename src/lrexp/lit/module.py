"""`LMModule`: the masked next-token loss, token-weighted metrics and the optimiser around a `LongRangeLM`.

The carried state is not kept here: each step asks the `TBPTTCallback` for the state of its stage (already
reset for lanes that start a document) and gives the new state back. The model's forward is pure.

The validations inside `fit` log `val/*` (a fixed budget of targets, the curve); `trainer.validate` and
`trainer.test` are the final passes over whole splits and log `final/val_*` and `final/test_*`, the numbers
a grid compares (the data module picks the pass by the same rule).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from lrexp.config.load import to_dict
from lrexp.config.schema import RunConfig
from lrexp.errors import UserError
from lrexp.lit.metrics import TokenStats, mention_buckets, token_nll
from lrexp.lit.optim import build_optimizer, build_scheduler
from lrexp.lit.tbptt import TBPTTCallback

CHECKPOINT_META_KEY = "lrexp"  # the run's resolved config and vocabulary, for resume and evaluation


class TrainingDiverged(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


class LMModule(pl.LightningModule):
    def __init__(self, cfg: RunConfig, model: nn.Module, tbptt: TBPTTCallback, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.tbptt = tbptt
        self.vocab_size = vocab_size
        edges, mentions = cfg.derived.position_buckets, mention_buckets(cfg.scale.window)
        self.stats = nn.ModuleDict({"val": TokenStats(edges, mentions), "test": TokenStats(edges, mentions)})

    def setup(self, stage: str) -> None:
        if not any(cb is self.tbptt for cb in self.trainer.callbacks):
            raise RuntimeError("LMModule's TBPTTCallback must be in Trainer(callbacks=...)")

    # ---- loss ---------------------------------------------------------------------------------------

    def _forward(
        self, stage: str, batch: Dict[str, Tensor], measure: bool = False
    ) -> tuple[Tensor, Tensor, Mapping[str, Any]]:
        """Per-token NLL [B, N] (0 where masked), the loss mask [B, N] and what the forward measured (the new
        state's `stats`; the layers' own only when `measure`)."""
        logits, state = self.model(batch["tokens"], self.tbptt.state(stage), measure=measure)  # [B, N, V]
        self.tbptt.update(stage, state)
        # padding and, unless loss.cross_segment_target, the segment-boundary target are masked by the data
        mask = batch["loss_mask"]  # [B, N] bool
        return token_nll(logits, batch["labels"], mask), mask, state.stats

    # ---- steps --------------------------------------------------------------------------------------

    def training_step(self, batch: Dict[str, Tensor], batch_idx: int) -> Tensor:
        # the kNN memory's recall@k and staleness cost an exact search: only on the steps Lightning logs
        logged = (self.global_step + 1) % self.cfg.log.every_n_steps == 0
        nll, mask, measured = self._forward("train", batch, measure=logged and bool(self.cfg.derived.knn_layers))
        nll_sum, count = nll.sum(), mask.sum()
        # The gradient is the token mean over every lane of the step: Lightning divides each micro-batch's
        # loss by the lane groups and DDP averages over ranks, so scaling by both leaves the sum over this
        # micro-batch divided by the step's targets over all groups and ranks. One step over G groups of B
        # lanes is then one step over G x B lanes, whatever their padding.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        loss = nll_sum * scale / batch["step_targets"].clamp(min=1)
        totals = self.trainer.strategy.reduce(
            torch.stack([nll_sum.detach(), count.to(nll_sum.dtype)]), reduce_op="sum"
        )  # [2]
        global_loss = totals[0] / totals[1].clamp(min=1)
        if not torch.isfinite(global_loss):
            raise TrainingDiverged(
                f"training loss is {global_loss.item()} at step {self.global_step}; lower optim.lr "
                f"(lr {self.optimizers().param_groups[0]['lr']:.3g} now) or set optim.grad_clip"
            )
        batch_size = mask.shape[0]
        self.log("train/loss", global_loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        last = self.global_step + 1 == self.trainer.max_steps
        if last and (self.global_step + 1) % self.trainer.log_every_n_steps and self.logger is not None:
            # Lightning logs every log.every_n_steps only: the last update's loss too, so that a run shorter
            # than the interval has one (micro-batches of that update: the last one's value stays)
            self.logger.log_metrics({"train/loss": global_loss.item()}, step=self.global_step)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False,
                 batch_size=batch_size)
        if "stage" in batch:  # a curriculum's (docs/knobs.md#window-curriculum)
            self.log("train/stage", batch["stage"].float(), on_step=True, on_epoch=False, batch_size=batch_size)
        # the kNN memory's retrieval, and the state compression's retained energy and error at this step's
        # segment boundary (docs/knobs.md#rank-k-state-compression)
        for name, value in (measured.items() if logged else ()):
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    def _eval_step(self, stage: str, batch: Dict[str, Tensor]) -> None:
        nll, mask, _ = self._forward(stage, batch)
        self.stats[stage].update(nll, mask, batch["target_bytes"], batch["doc_pos"], batch.get("answer_mask"),
                                 batch.get("mention_dist"))

    def _eval_epoch_end(self, stage: str) -> Dict[str, Tensor]:
        stats = self.stats[stage]
        final = self.trainer.state.fn != TrainerFn.FITTING
        values = {}
        for name, value in stats.compute().items():
            # a final pass: final/val_bits_per_token, final/val_bits_per_token_by_pos_0-256, ...
            values[f"final/{stage}_{name.replace('/', '_')}" if final else f"{stage}/{name}"] = value.float()
        stats.reset()
        if not final:  # at the optimiser step it follows (Lightning's default is the step before it)
            values["step"] = torch.tensor(float(self.global_step))
        # already reduced over ranks by torchmetrics; sync_dist only averages equal values (no warning)
        self.log_dict(values, sync_dist=True)
        return values

    def validation_step(self, batch: Dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ---- optimiser and checkpoints ------------------------------------------------------------------

    def configure_optimizers(self) -> Dict[str, Any]:
        optimizer = build_optimizer(self.cfg, self.model.named_parameters())
        scheduler = build_scheduler(self.cfg, optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_META_KEY] = {
            "config": to_dict(self.cfg),
            "vocab_size": self.vocab_size,
            "run_id": getattr(self.logger, "run_id", None),
        }

